"""Gradient work of :class:`~deepspeed_dualpipe.runtime.engine.DualPipeEngine` around the optimizer step.

- weight gradients handed to DeepSpeed's gradient path as each chunk finishes them: a deferred
  weight pass (torch's ``stage_backward_weight``) adds into ``.grad`` by hand, bypassing
  post-accumulate-grad hooks, so the engine does the bf16 optimizer's ``immediate_grad_update``
  itself and turns the split off (loudly) for any other hook (ZeRO's, a user's); bf16 gradients
  move into fp32 chunk by chunk;
- the mirror reduction: under DualPipe both copies of a stage saw half the batch;
- gradient clipping by the true global norm: every gradient counted once however many ranks hold a copy
  (mirror copies, tied modules, tensor-parallel replicas, data-parallel replicas), summed over every rank;
- fp16: the loss scaled at the loss stage, DeepSpeed's optimizers unscale and skip on overflow.
"""

import torch
from deepspeed import comm as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.utils import groups, logger


class GradientReductions:
    """Weight gradients into DeepSpeed's path, mirror reduction, clipping and fp16 loss scaling (a mixin of the
    engine)."""

    # ----- weight gradients, as each chunk finishes them -------------------------------------------
    def _immediate_bf16(self) -> bool:
        return self.using_bf16_optimizer and self._config.bfloat16_config.immediate_grad_update

    def _check_gradient_hooks(self):
        """Before each training batch: a post-accumulate-grad hook fires inside autograd's accumulation into
        ``.grad``, which a deferred weight pass (torch's ``stage_backward_weight``) bypasses. The engine stands
        in for the bf16 optimizer's own (``bf16.immediate_grad_update``); with any other hook (ZeRO's gradient
        hooks, a user's), it turns the split off, loudly: every backward then runs whole, the same numbers."""
        if not self._split:
            return
        own = {h.id for h in getattr(self.optimizer, "_grad_acc_hooks", [])} if self._immediate_bf16() else set()
        foreign = [(n, p) for n, p in self.module.named_parameters() if set(_post_accumulate_hooks(p)) - own]
        if not foreign:
            return
        if isinstance(self.optimizer, ZeROOptimizer):
            cause = ("DeepSpeed's ZeRO gradient hooks (zero_optimization.stage with data_types.grad_accum_dtype "
                     "other than the parameters' dtype, or zero_optimization.overlap_comm)")
        else:
            cause = f"post-accumulate-grad hooks on {len(foreign)} parameter(s), e.g. {foreign[0][0]}"
        logger.warning(f"deepspeed_dualpipe: {cause} run only inside autograd's own accumulation into .grad, which "
                       f"a deferred weight pass bypasses; dualpipe.split_backward is turned off for this engine: "
                       f"every backward runs whole (same numbers, no zero-bubble weight deferral)")
        self._split = False

    def _grad_versions(self, chunk):
        """What a weight pass changes (bf16 ``immediate_grad_update``): each parameter's gradient and its version."""
        if not self._immediate_bf16():
            return None
        return [(p, i, j, p.grad, None if p.grad is None else p.grad._version) for p, i, j in self._hp_slots(chunk)]

    def _weight_gradients_done(self, chunk, before=None):
        """``chunk`` finished one micro-batch's weight gradients (a B, a pair's B, an I that fell back to a full
        backward, or a W), into the optimizer's fp32 gradients, this chunk's parameters only:

        - bf16 with ``immediate_grad_update``: autograd ran the optimizer's hooks for a B; a W (``before``, from
          :meth:`_grad_versions`) added into ``.grad`` by hand, so the engine does what those hooks do for every
          parameter the W changed;
        - bf16 otherwise: as DeepSpeed's 1F1B after every backward, so micro-batches accumulate in fp32.
        """
        if not self.using_bf16_optimizer:
            return
        if self._immediate_bf16():
            for p, i, j, grad, version in before or ():
                if p.grad is not None and (p.grad is not grad or p.grad._version != version):
                    self.optimizer.accumulate_hp_grads_and_remove_lp(p, i, j)
            return
        update = self.optimizer._update_hp_grad
        for p, i, j in self._hp_slots(chunk):
            update(p, i, j, clear_lp_grads=True)

    def _hp_slots(self, chunk):
        """``(parameter, group, index)`` in the bf16 optimizer's groups, for ``chunk``'s parameters."""
        if chunk not in self._hp_slot_cache:
            where = {id(p): (i, j) for i, group in enumerate(self.optimizer.bf16_groups) for j, p in enumerate(group)}
            self._hp_slot_cache[chunk] = [(p, *where[id(p)]) for p in self.module.chunk_parameters(chunk)
                                          if id(p) in where]
        return self._hp_slot_cache[chunk]

    @torch.no_grad()  # gradients a custom Function accumulated by hand may be views made without grad mode
    def _exec_reduce_mirror_grads(self):
        """Reduce DualPipe's two copies of every stage: both saw half the batch.

        Without ZeRO, each gradient is reduced once over all its holders in one canonical order, the parameters'
        names, in DeepSpeed's buckets, so every copy gets the same bits: a dense one over the mirror pair in every
        data-parallel replica, an expert's over the mirror image of its expert-data-parallel group
        (:mod:`~deepspeed_dualpipe.runtime.groups`); the sum is divided as DeepSpeed's data-parallel reduction
        divides, and DeepSpeed's own reductions then skip them (:meth:`_reduce_non_expert_gradients`,
        :meth:`_reduce_expert_gradients`). Reduced in two steps, the pair and then data parallelism, the two
        copies would be summed in different orders and drift apart. With ZeRO (whose reduction partitions by
        data-parallel rank) the sum is over the mirror pair, and DeepSpeed reduces over data parallelism afterwards.
        """
        self._drain_sends()
        params = [
            p for _, p in self.module.named_mirror_tensors() if isinstance(p, torch.nn.Parameter) and p.requires_grad
        ]
        if isinstance(self.optimizer, ZeROOptimizer):
            self._reduce_buckets(params, self.module.mirror_group, 1)
            return
        dense = [p for p in params if getattr(p, "allreduce", True)]
        if dense:
            self._reduce_buckets(dense, self.module.holder_group, self.dp_world_size)
        self._dense_reduced = bool(dense)
        self._experts_reduced = self._reduce_expert_copies([p for p in params if not getattr(p, "allreduce", True)])

    def _reduce_expert_copies(self, experts) -> bool:
        """Reduce each expert gradient once over every copy of its shard (its expert-data-parallel group and that
        group's mirror image), one expert group name at a time; True if there were any."""
        by_name = {}
        for p in experts:
            by_name.setdefault(p.group_name, []).append(p)
        for name, group_params in sorted(by_name.items()):
            # DeepSpeed divides expert gradients by the whole data-parallel size too (_reduce_expert_gradients)
            self._reduce_buckets(group_params, self.expert_holder_groups[name], self.dp_world_size)
        return bool(by_name)

    def _reduce_buckets(self, params, group, averaged_over):
        """All-reduce the gradients of ``params`` over ``group`` in DeepSpeed's buckets (``allreduce_no_retain``: the
        sum divided by ``averaged_over``, as its data-parallel reduction), one dtype at a time, in this order."""
        grads = [self._gradient(p, create=True) for p in params]
        for dtype in sorted({g.dtype for g in grads}, key=str):
            self.allreduce_no_retain([g for g in grads if g.dtype == dtype],
                                     dp_group=group,
                                     numel_per_bucket=MEMORY_OPT_ALLREDUCE_SIZE,
                                     dp_world_size=averaged_over)

    def _reduce_non_expert_gradients(self, grads, elements_per_buffer):
        """DeepSpeed's data-parallel reduction of dense gradients, skipped when the mirror reduction has reduced
        them over all their holders already."""
        if getattr(self, "_dense_reduced", False):
            return
        PipelineEngine._reduce_non_expert_gradients(self, grads, elements_per_buffer)

    def _reduce_expert_gradients(self, expert_grads, elements_per_buffer):
        """DeepSpeed's expert-data-parallel reduction, skipped when the mirror reduction has reduced the experts over
        all their holders already."""
        if getattr(self, "_experts_reduced", False):
            return
        PipelineEngine._reduce_expert_gradients(self, expert_grads, elements_per_buffer)

    def _exec_reduce_grads(self):
        try:
            PipelineEngine._exec_reduce_grads(self)
        finally:
            self._dense_reduced = self._experts_reduced = False

    def _gradient(self, p, create=False):
        """Where ``p``'s accumulated gradient lives: the bf16 optimizer's fp32 copy, ZeRO's ``grad_accum`` when it
        accumulates in another dtype (``data_types.grad_accum_dtype``), else ``p.grad``. ``create``: a zero gradient
        where there is none yet, as DeepSpeed's own reduction makes (every holder reduces the same tensors)."""
        if self.using_bf16_optimizer:
            if create and getattr(p, "_hp_grad", None) is None:
                for q, i, j in self._hp_slots_all():
                    if q is p:
                        p._hp_grad = self.optimizer.fp32_groups_gradients[i][j]
                        self.optimizer.fp32_groups_has_gradients[i][j] = True
            return getattr(p, "_hp_grad", None)
        attribute = "grad_accum" if getattr(self.optimizer, "use_grad_accum_attribute", False) else "grad"
        if create and getattr(p, attribute, None) is None:
            dtype = self.optimizer.gradient_accumulation_dtype if attribute == "grad_accum" else p.dtype
            setattr(p, attribute, torch.zeros(p.shape, dtype=dtype, device=p.device))
        return getattr(p, attribute, None)

    def _hp_slots_all(self):
        return [slot for chunk in range(len(self.module.chunk_funcs)) for slot in self._hp_slots(chunk)]

    def clip_fp32_gradients(self):
        """Clip to ``gradient_clipping`` by the true global norm: the norm of every gradient of the model, each
        counted once (:meth:`_counts_in_norm`), the same bits on every rank.

        Each gradient is counted on exactly one rank of all that hold a copy of it, and one all-reduce over every
        rank sums the shares: it runs over every axis that shards parameters (pipeline, tensor, expert) and gives
        every rank the same coefficient, so tensor-parallel replicas and mirror copies stay bit-identical. No host
        sync: the norms come from ``torch._foreach_norm`` and the gradients are multiplied by the coefficient
        clamped to 1 instead of branching on it (``clip_grad_norm_``'s own way). Returns that coefficient (a tensor).
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        total = self._squared_norm([p for p in params if self._counts_in_norm(p)])
        dist.all_reduce(total)
        # torch.nn.utils.clip_grad_norm_'s rule
        coefficient = (self.gradient_clipping() / (total.sqrt() + 1e-6)).clamp(max=1.0)
        if params:
            torch._foreach_mul_([p.grad for p in params], coefficient)
        return coefficient

    def _counts_in_norm(self, p) -> bool:
        """Whether this rank counts ``p``'s gradient in the global norm: one holder of every copy does.

        - DualPipe's second copy of a stage and a tied module's non-owning holders are ``ds_pipe_replicated``;
        - a parameter every tensor-parallel rank holds whole (a layer norm, a row-parallel bias: not marked
          ``tensor_model_parallel`` or ``model_parallel``) counts on tensor-parallel rank 0, a shard on every rank;
        - a dense gradient counts on data-parallel rank 0 (the replicas hold the same reduced gradient), an
          expert's on rank 0 of its expert-data-parallel group.
        """
        if getattr(p, "ds_pipe_replicated", False):
            return False
        if not is_model_parallel_parameter(p) and self.grid.get_slice_parallel_rank() != 0:
            return False
        if getattr(p, "allreduce", True):
            return self.grid.get_data_parallel_rank() == 0
        return groups._get_expert_data_parallel_rank(p.group_name) == 0

    def _squared_norm(self, params):
        if not params:
            return torch.zeros((), device=self.device)
        norms = torch._foreach_norm([p.grad.detach() for p in params], 2, dtype=torch.float32)
        return torch.stack(norms).pow(2).sum()

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
        if not getattr(self.optimizer, "use_grad_accum_attribute", False):
            return PipelineEngine._exec_reduce_tied_grads(self)
        # ZeRO accumulating in another dtype keeps the gradients in grad_accum, where DeepSpeed's own tied
        # reduction (which reads .grad) does not look
        for weight, group in self.module.get_tied_weights_and_groups():
            grad = self._gradient(weight)
            if grad is not None:
                dist.all_reduce(grad, group=group)


def _post_accumulate_hooks(p):
    """The post-accumulate-grad hooks registered on ``p`` (``Tensor.register_post_accumulate_grad_hook``, which
    DeepSpeed's ``register_grad_hook`` uses): torch keeps them in this private dict, empty if none."""
    return getattr(p, "_post_accumulate_grad_hooks", None) or {}
