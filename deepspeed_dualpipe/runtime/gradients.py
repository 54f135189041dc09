"""Gradient work of :class:`~deepspeed_dualpipe.runtime.engine.DualPipeEngine` around the optimizer step.

- the mirror reduction: under DualPipe both copies of a stage saw half the batch;
- gradient clipping by a global norm that counts each parameter once (mirror copies, tied
  modules) and every expert of every expert-parallel rank;
- fp16: the loss scaled at the loss stage, DeepSpeed's optimizers unscale and skip on overflow.
"""

import torch
from deepspeed import comm as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import groups


class GradientReductions:
    """Mirror reduction, clipping and fp16 loss scaling (a mixin of the engine)."""

    @torch.no_grad()  # gradients a custom Function accumulated by hand may be views made without grad mode
    def _exec_reduce_mirror_grads(self):
        """Sum every gradient across the mirror pair (r, P-1-r): both copies of a stage see half the batch."""
        self._drain_sends()
        params = [
            p for _, p in self.module.named_mirror_tensors() if isinstance(p, torch.nn.Parameter) and p.requires_grad
        ]
        grads = [self._gradient(p) for p in params]
        flat = torch.cat([
            g.reshape(-1) if g is not None else torch.zeros(p.numel(), dtype=self._grad_dtype(), device=p.device)
            for p, g in zip(params, grads)
        ])
        dist.all_reduce(flat, group=self.module.mirror_group)
        offset = 0
        for p, g in zip(params, grads):
            reduced = flat[offset:offset + p.numel()]
            offset += p.numel()
            if g is not None:
                g.copy_(reduced.view_as(g))
            elif not self.using_bf16_optimizer:
                p.grad = reduced.view_as(p).clone()

    def _gradient(self, p):
        """Where ``p``'s accumulated gradient lives: the bf16 optimizer's fp32 copy, else ``p.grad``."""
        return getattr(p, "_hp_grad", None) if self.using_bf16_optimizer else p.grad

    def _grad_dtype(self):
        return torch.float32 if self.using_bf16_optimizer else next(self.module.parameters()).dtype

    def clip_fp32_gradients(self):
        """Clip to ``gradient_clipping`` by the global norm, counting every parameter once.

        A stage held twice (DualPipe's mirror copies) or a tied module held by several ranks
        is marked ``ds_pipe_replicated`` on all but one holder and left out of the norm.
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        owned = [p for p in params if not getattr(p, "ds_pipe_replicated", False)]
        total = self._squared_norm([p for p in owned if getattr(p, "allreduce", True)])
        # MoE experts (DeepSpeed marks them allreduce=False): each expert-parallel rank holds other experts
        # of the same stage, so their share of the norm is summed over the expert-parallel group first.
        experts = {}
        for p in owned:
            if not getattr(p, "allreduce", True):
                experts.setdefault(p.group_name, []).append(p)
        for name, group_params in sorted(experts.items()):
            share = self._squared_norm(group_params)
            dist.all_reduce(share, group=groups._get_expert_parallel_group(name))
            total += share
        dist.all_reduce(total, group=self.grid.get_pipe_parallel_group())
        coefficient = self.gradient_clipping() / (total.sqrt() + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
        if coefficient < 1:
            for p in params:
                p.grad.mul_(coefficient)

    def _squared_norm(self, params):
        squares = [p.grad.detach().float().pow(2).sum() for p in params]
        return torch.stack(squares).sum() if squares else torch.zeros((), device=self.device)

    # ----- fp16 loss scaling ---------------------------------------------------------------------
    def _scale_loss(self, loss):
        """fp16: ``loss`` times the optimizer's loss scale (DeepSpeed's fp16 optimizers unscale in ``step()``),
        at ZeRO stage 0 and 1 alike (docs/design.md, "Design notes"); else ``loss`` unchanged."""
        if not self.fp16_enabled():
            return loss
        if isinstance(self.optimizer, ZeROOptimizer):
            return self.optimizer.scale_if_loss(loss)
        return loss.float() * self._loss_scale()

    def _loss_scale(self) -> float:
        """The factor :meth:`_scale_loss` applies: the fp16 optimizer's ``loss_scale`` (its ``cur_scale``,
        or the external scale), 1.0 without fp16. Constant within a batch: only ``step()`` changes it."""
        if not self.fp16_enabled() or self.optimizer is None:
            return 1.0
        return float(self.optimizer.loss_scale)

    def _take_model_step(self, lr_kwargs):
        """DeepSpeed's optimizer step, with the gradients of second copies tagged ``ds_pipe_replicated`` so that
        ``FP16_UnfusedOptimizer``'s gradient norm counts every parameter once (docs/design.md, "Design notes")."""
        tagged = []
        if isinstance(self.optimizer, FP16_UnfusedOptimizer):
            for p in self.module.parameters():
                if getattr(p, "ds_pipe_replicated", False) and p.grad is not None:
                    p.grad.ds_pipe_replicated = True
                    tagged.append(p.grad)
        try:
            PipelineEngine._take_model_step(self, lr_kwargs)
        finally:
            for grad in tagged:
                del grad.ds_pipe_replicated

    def _exec_reduce_tied_grads(self):
        self._drain_sends()
        PipelineEngine._exec_reduce_tied_grads(self)
