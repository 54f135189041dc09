"""``DualPipeEngine``: DeepSpeed's ``PipelineEngine`` as an interpreter of the plugin's schedules.

One ``_exec_*`` method per instruction, as in DeepSpeed. What differs from 1F1B:
- state is kept per buffer slot (:class:`.slots.Slot`), never once per engine; who writes and
  who clears each field:

  ==============  =============================  ===========================================
  Slot field      set by                         cleared by
  ==============  =============================  ===========================================
  inputs          LoadMicroBatch, the CommitP2P   SendGrad, or the backward at a first stage
                  posting a RecvActivation,
                  a hand-off
  labels          LoadMicroBatch                 the forward (loss computed)
  outputs         the forward                    the backward (after a send or a hand-off only
                                                 their shapes stay, see ``_handed_on``)
  output_edges    a send or a hand-off           the backward
  loss            the forward at a loss stage    the backward
  output_grads    RecvGrad (queued)              the backward
  input_grads     the backward                   SendGrad
  tape            a phased forward               the backward
  weight_part     BackwardInput, a pair's I      BackwardWeight
  ==============  =============================  ===========================================

  Between the two chunks of one rank (DualPipeV's turn) tensors go through :class:`.slots.Handoffs`:
  activations forward, gradients backward, never through a slot;
- point-to-point traffic is queued and posted at each ``CommitP2P`` as one batch (one NCCL group),
  waited where the data is used, bounded by ``dualpipe.p2p_timeout_s`` on gloo (:mod:`.p2p`);
- chunks with phased (MoE) layers run phase by phase, and an overlapped pair interleaves
  its backward and forward so each all-to-all hides under the other micro-batch (:mod:`.autograd.steps`);
- backward may be split into input gradients now (``BackwardInput``) and weight
  gradients later (``BackwardWeight``);
- losses come from whichever rank holds a micro-batch's loss stage and are summed over
  the pipeline, so ``train_batch()`` returns the same global mean on every rank;
- mirror reduction, clipping and fp16 loss scaling live in :mod:`.gradients`.
"""

from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge
from deepspeed import comm as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.pipe.engine import BATCH_INPUT_TIMER, PipelineEngine
from deepspeed.utils.timer import (BACKWARD_GLOBAL_TIMER, BACKWARD_MICRO_TIMER, FORWARD_GLOBAL_TIMER,
                                   FORWARD_MICRO_TIMER)
from deepspeed.utils import logger

from deepspeed_dualpipe import checkpoint
from deepspeed_dualpipe.schedule import instructions
from deepspeed_dualpipe.runtime.autograd import steps
from deepspeed_dualpipe.runtime.gradients import GradientReductions
from deepspeed_dualpipe.runtime.autograd.aux_loss import aux_loss_scale
from deepspeed_dualpipe.runtime.module import DualPipeModule
from deepspeed_dualpipe.runtime.cuda_env import warn_about_connections
from deepspeed_dualpipe.runtime.monitor import StepFigures
from deepspeed_dualpipe.runtime.p2p import PointToPoint, as_tuple as _as_tuple
from deepspeed_dualpipe.runtime.slots import Handoffs, Slot
from deepspeed_dualpipe.runtime.groups import create_expert_holder_groups, mirror_rank_lists
from deepspeed_dualpipe.schedule import build_schedule, get_spec
from deepspeed_dualpipe.runtime.autograd import saved
from deepspeed_dualpipe.runtime.autograd.split_backward import SplitBackward, module_supports_split

_FORWARD_TIMERS = (FORWARD_MICRO_TIMER, FORWARD_GLOBAL_TIMER)
_BACKWARD_TIMERS = (BACKWARD_MICRO_TIMER, BACKWARD_GLOBAL_TIMER)


class DualPipeEngine(PointToPoint, GradientReductions, PipelineEngine):
    """Runs a :class:`~deepspeed_dualpipe.runtime.module.DualPipeModule` with its schedule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.module, DualPipeModule):
            raise TypeError("DualPipeEngine needs a deepspeed_dualpipe.DualPipeModule; build one with "
                            "DualPipeModule(..., schedule=...) or use deepspeed_dualpipe.initialize()")
        from deepspeed_dualpipe.config import dualpipe_config  # local: the config module imports the registry
        self.dualpipe = dualpipe_config(self._config._param_dict)
        self.schedule_name = self.module.schedule
        self._init_point_to_point()  # runtime/p2p.py: queues, channel shapes, pending sends
        self._split = self.dualpipe.split_backward and module_supports_split(self.module)
        self.slots = []  # one Slot per buffer slot of the running schedule (see runtime/slots.py)
        self.handoffs = Handoffs.empty()
        self.trace = None  # a list of InstructionTime while runtime.trace.start_recording records
        self.phase_events = None  # set to [] to record (label, start, end) of each phase of the overlapped pairs
        self.run_events = None  # likewise for the computations that run alone (runtime/profile.py)
        # A recorded step's clock (runtime/profile.py): phases and waits are stamped on it (CUDA events on the
        # stream) and resolved once, at the step's end; None otherwise.
        self.step_clock = None
        self._wait_stamps = []
        self._waited = 0.0
        self.memory_meter = None  # an activation meter for recorded steps (runtime/profile.py); None: the allocator's
        self._hp_slot_cache = {}  # chunk -> (parameter, group, index) in the bf16 optimizer
        get_spec(self.schedule_name).validate(self.num_stages, self.micro_batches)  # before any step
        self._refuse_unsupported()
        if self.module.holder_group is not None and isinstance(self.optimizer,
                                                               ZeROOptimizer) and self.dp_world_size > 2:
            raise ValueError(
                f"dualpipe with zero_optimization.stage={self.zero_optimization_stage()} and "
                f"{self.dp_world_size} data-parallel replicas: ZeRO reduces each rank's gradients in its "
                f"own partitioned order, so the two copies of a stage would be summed in different orders "
                f"and drift apart; use zero_optimization.stage 0 (the engine then reduces each gradient "
                f"once over all its holders) or at most 2 data-parallel replicas")
        # every copy of an expert shard, reduced once (gradients.py); every rank makes these groups
        self.expert_holder_groups = create_expert_holder_groups(mirror_rank_lists(self.module._topo)[0]) \
            if self.module.holder_group is not None and not isinstance(self.optimizer, ZeROOptimizer) else {}
        phased = [c for c in range(len(self.module.chunk_funcs)) if self.module.chunk_is_phased(c)]
        self._recompute = check_recompute_islands(self.dualpipe.recompute_islands, self.module)
        self._release = saved.Policy()  # which chunks and islands record their saves as releasable (autograd/saved.py)
        if phased and self.module.activation_checkpoint_interval > 0:
            logger.warning(f"deepspeed_dualpipe: chunks {phased} hold phased (MoE) layers and run phase by phase; "
                           f"activation_checkpoint_interval={self.module.activation_checkpoint_interval} applies to "
                           f"the other chunks only (recomputed islands there: "
                           f"dualpipe.recompute_islands={sorted(self._recompute)})")
        self.figures = StepFigures(self, self.dualpipe.dualpipe)
        warn_about_connections(self)  # CUDA_DEVICE_MAX_CONNECTIONS=1 would serialise the overlapped pairs
        if self.dualpipe.verify_schedule:
            from deepspeed_dualpipe.analysis.verify import verify
            verify(self.schedule_name, self.num_stages, self.micro_batches)
        if self.global_rank == 0:
            logger.info(f"deepspeed_dualpipe: schedule={self.schedule_name} stages={self.num_stages} "
                        f"micro_batches={self.micro_batches} split_backward={self._split}")

    def _refuse_unsupported(self):
        """What DeepSpeed's PipelineEngine offers and the plugin's cannot honour, refused before step 1."""
        if self.is_pipe_partitioned or self.is_grad_partitioned:
            raise ValueError("pipeline.pipe_partitioned / pipeline.grad_partitioned (activations and gradients "
                             "partitioned over the tensor-parallel ranks between stages) are not supported by the "
                             "plugin's schedules: set both to false in the pipeline section of the config")
        if self.dynamic_shape:
            raise ValueError("dynamic shapes (PipelineModule(dynamic_shape=True), pipeline.dynamic_shape) are not "
                             "supported by the plugin's schedules: each channel's activation shapes travel once, in "
                             "the first batch; pad or bucket the batches and build the module without dynamic_shape")

    @contextmanager
    def _timed(self, *names):
        """``wall_clock_breakdown``: DeepSpeed's timers of these names around the block (else nothing)."""
        if not self.wall_clock_breakdown():
            yield
            return
        for name in names:
            self.timers(name).start()
        try:
            yield
        finally:
            for name in reversed(names):
                self.timers(name).stop()

    # ----- schedules and batches ----------------------------------------------------------------
    def _train_schedule(self):
        return build_schedule(self.schedule_name, self.micro_batches, self.num_stages, self.stage_id)

    def _inference_schedule(self, micro_batches):
        return build_schedule(self.schedule_name, micro_batches, self.num_stages, self.stage_id, forward_only=True)

    def _reserve_pipe_buffers(self, num_buffers):
        """Fresh slots for a schedule (DeepSpeed's own ``pipe_buffers`` lists are not used)."""
        self.slots = [Slot() for _ in range(num_buffers)]

    def _exec_schedule(self, pipe_schedule):
        self._batch = {}
        if not pipe_schedule.forward_only:
            self._check_gradient_hooks()
        self.layout = pipe_schedule.layout  # paths depend on M: DualPipe feeds half from each end
        self._batch_count = pipe_schedule.micro_batches
        self._loss_sum = torch.zeros((), device=self.device)
        self._additional_sums = {}  # name -> sum of the model's additional losses (get_additional_losses)
        try:
            # MoE aux losses weigh 1/M, as the losses do, and carry the fp16 loss scale, as they do
            with aux_loss_scale(self._loss_scale() / self._batch_count):
                super()._exec_schedule(pipe_schedule)
            self._drain_sends()
        finally:
            self._batch, self.handoffs, self._queued = {}, Handoffs.empty(), []

    def train_batch(self, data_iter=None):
        # every dualpipe.monitor_interval-th step, and dualpipe.profile_step, are recorded (runtime/monitor.py)
        return self.figures.train_batch(self.global_steps, lambda: self._train_batch(data_iter))

    def _train_batch(self, data_iter):
        try:
            super().train_batch(data_iter)
        except BaseException:
            # A failed batch (a peer timed out, bad data) leaves DeepSpeed's timers running, and the
            # next train_batch would then fail on "timer has already been started" instead of its own error.
            for timer in getattr(self.timers, "timers", {}).values():
                if getattr(timer, "started_", False):
                    timer.reset()
            raise
        return self.agg_train_loss

    def _aggregate_total_loss(self):
        """The mean loss of the batch over all micro-batches and data-parallel ranks, on every rank; the model's
        additional losses likewise, in ``agg_additional_losses`` (as DeepSpeed's engine reports them)."""
        names = list(self.module.get_additional_losses() or {})  # every rank knows the names, as in DeepSpeed
        zero = torch.zeros((), device=self.device)
        totals = torch.stack([self._loss_sum.detach().float()] +
                             [self._additional_sums.get(name, zero).to(self.device) for name in names])
        if self.is_pipe_parallel:  # losses come from whichever ranks hold loss stages
            dist.all_reduce(totals, group=self.grid.get_pipe_parallel_group())
        totals /= self._batch_count
        self.dp_group_loss = totals[0].clone()
        if self.is_data_parallel:
            dist.all_reduce(totals, group=self.mpu.get_data_parallel_group())
            totals /= self.dp_world_size
        self.agg_additional_losses = OrderedDict(zip(names, totals[1:].unbind())) if names else None
        return totals[0]

    def eval_batch(self,
                   data_iter,
                   return_logits=False,
                   compute_loss=True,
                   reduce_output="avg",
                   bcast_loss=True,
                   num_micro_batches=None):
        """Forward-only schedule; returns the mean loss on every rank (and this rank's loss-stage outputs).

        ``compute_loss=False``: no loss; a rank that holds a loss stage returns the mean of the outputs it
        computed there (``reduce_output=None``: their list), the others ``None``. Under DualPipe two ranks hold
        loss stages, each for half of the micro-batches (DeepSpeed's engine returns them from its last stage).
        """
        self.module.eval()
        self._compute_loss = compute_loss
        self.eval_return_logits = return_logits
        self._eval_outputs, self._stage_outputs = [], []
        train_iterator = self.data_iterator
        self.set_dataiterator(data_iter)
        micro_batches = self.micro_batches if num_micro_batches is None else num_micro_batches
        try:
            with torch.no_grad():
                self._exec_schedule(self._inference_schedule(micro_batches))
                if compute_loss:
                    loss = self._aggregate_total_loss()
                else:
                    loss = _reduce_outputs(self._stage_outputs, reduce_output)
        finally:
            self.set_dataiterator(train_iterator)
            self.eval_return_logits, self._compute_loss, self._stage_outputs = False, True, []
        return (loss, self._eval_outputs) if return_logits else loss

    # ----- checkpoints: DeepSpeed's files, saved atomically (deepspeed_dualpipe.checkpoint) -----
    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):
        """DeepSpeed's ``save_checkpoint`` (same files), never left half-written: every rank writes into a
        staging directory, which is renamed to ``tag`` once all have written; ``latest`` changes only then.
        A rank that dies mid-save makes the others raise ``CheckpointError`` within ``dualpipe.p2p_timeout_s``."""
        return checkpoint.save_checkpoint(self,
                                          save_dir,
                                          tag,
                                          client_state,
                                          save_latest,
                                          exclude_frozen_parameters,
                                          timeout_s=self.dualpipe.p2p_timeout_s)

    def load_checkpoint(self,
                        load_dir,
                        tag=None,
                        load_module_strict=True,
                        load_optimizer_states=True,
                        load_lr_scheduler_states=True,
                        load_module_only=False,
                        custom_load_fn=None):
        """DeepSpeed's ``load_checkpoint``, from a checkpoint written under any schedule and pipeline depth that
        can cut the model. Optimizer state loads only into the placement it was saved from; elsewhere this
        raises ``CheckpointError`` unless ``load_optimizer_states=False`` (weights, steps and scheduler only)."""
        return checkpoint.load_checkpoint(self, load_dir, tag, load_module_strict, load_optimizer_states,
                                          load_lr_scheduler_states, load_module_only, custom_load_fn)

    def _micro_batch(self, micro_batch: int):
        """Micro-batch ``micro_batch`` of this batch, read in order from the data iterator."""
        while len(self._batch) <= micro_batch:
            batch = self._next_batch()
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"pipeline rank {self.stage_id}: micro-batch {len(self._batch)} from the data "
                                 f"iterator is a {type(batch).__name__}, not an (inputs, labels) pair; yield "
                                 f"(inputs, labels) micro-batches as for DeepSpeed's PipelineEngine")
            self._batch[len(self._batch)] = batch
        return self._batch[micro_batch]

    def _loss_ranks(self) -> str:
        ends = sorted({self.layout.path(m)[-1][0] for m in range(self.layout.micro_batches)})
        return "pipeline ranks " + ", ".join(map(str, ends))

    # ----- where this rank sits on a micro-batch's path -----------------------------------------
    def _upstream(self, chunk, micro_batch):
        return self.layout.upstream(self.stage_id, chunk, micro_batch)

    def _downstream(self, chunk, micro_batch):
        return self.layout.downstream(self.stage_id, chunk, micro_batch)

    def _local(self, location) -> bool:
        return location is not None and location[0] == self.stage_id

    # ----- instructions --------------------------------------------------------------------------
    def _exec_load_micro_batch(self, buffer_id, chunk, micro_batch):
        with self._timed(BATCH_INPUT_TIMER):
            self._load(buffer_id, chunk, micro_batch)

    def _load(self, buffer_id, chunk, micro_batch):
        slot, (inputs, labels) = self.slots[buffer_id], self._micro_batch(micro_batch)
        if self._upstream(chunk, micro_batch) is None:
            loaded = tuple(self._to_device(t, copy=True).detach() for t in _as_tuple(inputs))
            slot.inputs = loaded if isinstance(inputs, (tuple, list)) else loaded[0]
        if self._downstream(chunk, micro_batch) is None and labels is not None:  # None: named at the loss
            slot.labels = tuple(self._to_device(t) for t in _as_tuple(labels)) \
                if isinstance(labels, (tuple, list)) else self._to_device(labels)

    def _to_device(self, t, copy=False):
        """``t`` on this rank's device without a host sync: from host memory through pinned memory and a
        non-blocking copy (a blocking ``.to()`` from pageable memory would drain the GPU at every load)."""
        if t.device == self.device:
            return t.clone() if copy else t
        if self.device.type == "cuda" and t.device.type == "cpu":
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
        return t.to(self.device)

    def _exec_forward_pass(self, buffer_id, chunk, micro_batch):
        # wall_clock_breakdown: DeepSpeed's forward hooks time a call of the module; a phased chunk, which runs its
        # layers' steps instead, is timed here
        with self._timed(*(_FORWARD_TIMERS if self.module.chunk_is_phased(chunk) else ())):
            steps.run(self._forward_steps(buffer_id, chunk, micro_batch),
                      events=self.run_events,
                      label=f"F{micro_batch}.{chunk}",
                      device=self.device,
                      clock=self.step_clock)

    def _forward_steps(self, buffer_id, chunk, micro_batch):
        """One micro-batch's forward through ``chunk``, as steps (a generator, see :mod:`.autograd.steps`).

        A chunk with phased layers (``forward_steps``, e.g. :class:`~deepspeed_dualpipe.moe.DualPipeMoE`)
        is recorded on a tape of autograd islands and yields at every all-to-all it launches, so an
        overlapped pair can run the other micro-batch meanwhile; any other chunk runs as DeepSpeed's
        ``PipelineModule.forward`` (activation checkpointing included) in one step.
        """
        slot, inputs = self.slots[buffer_id], self._inputs(buffer_id, chunk, micro_batch)
        if self.module.chunk_is_phased(chunk):
            tape = steps.Tape(recompute=self._recompute, release=self._release)
            outputs = yield from steps.forward_steps(self.module.chunk_funcs[chunk], inputs, tape)
            slot.tape = tape if torch.is_grad_enabled() else None
        else:
            with self.module.chunk(chunk), self._release.recording(chunk):  # the input part may release what
                outputs = self.module(inputs)  # only it reads
            self._release.learn(chunk, outputs)
        downstream = self._downstream(chunk, micro_batch)
        if downstream is None:
            self._loss_stage(buffer_id, outputs)
        else:
            slot.outputs = outputs
            if self._local(downstream):  # the V turns here: hand the tensors to the next chunk
                self.handoffs.activations[downstream[1], micro_batch] = _detached(outputs)
                self._handed_on(buffer_id)
        if not torch.is_grad_enabled():
            slot.inputs = None
            if downstream is None or self._local(downstream):
                slot.outputs = None

    def _loss_stage(self, buffer_id, outputs):
        slot = self.slots[buffer_id]
        if self._compute_loss and self.module.loss_fn is not None:
            labels = slot.labels
            if labels is None:
                raise ValueError(f"pipeline rank {self.stage_id} computes the loss but its micro-batch has no labels "
                                 f"(None): the data iterator must yield (inputs, labels) on every rank that holds a "
                                 f"loss stage ({self._loss_ranks()})")
            loss = self.module.loss_fn(outputs, labels)
        else:
            loss = outputs
        slot.labels = None
        if self.eval_return_logits:
            self._eval_outputs.append(outputs)
        if self._compute_loss:
            self._loss_sum += loss.detach().float()
        else:  # eval_batch(compute_loss=False): the outputs themselves, not a loss
            self._stage_outputs.append(outputs.detach())
        for name, value in (self.module.get_additional_losses() or {}).items():
            if value is not None:  # e.g. Megatron's "lm loss" and "moe loss" of this micro-batch
                total = self._additional_sums.get(name)
                value = value.detach().float().reshape(())
                self._additional_sums[name] = value if total is None else total + value
        slot.loss = loss if torch.is_grad_enabled() else None

    def _inputs(self, buffer_id, chunk, micro_batch):
        slot, upstream = self.slots[buffer_id], self._upstream(chunk, micro_batch)
        if self._local(upstream):
            slot.inputs = self.handoffs.activations.pop((chunk, micro_batch))
        else:
            slot.activation_recv = self._wait(slot.activation_recv, "the activation", chunk, micro_batch, upstream)
        return slot.inputs

    def _exec_backward_pass(self, buffer_id, chunk, micro_batch):
        with self._timed(*_BACKWARD_TIMERS):
            steps.run(self._backward_steps(buffer_id, chunk, micro_batch, split=False),
                      events=self.run_events,
                      label=f"B{micro_batch}.{chunk}",
                      device=self.device,
                      clock=self.step_clock)
            self._weight_gradients_done(chunk)

    def _exec_backward_input(self, buffer_id, chunk, micro_batch):
        with self._timed(*_BACKWARD_TIMERS):
            handle = steps.run(self._backward_steps(buffer_id, chunk, micro_batch, self._split),
                               events=self.run_events,
                               label=f"B{micro_batch}.{chunk}",
                               device=self.device,
                               clock=self.step_clock)
            self._keep_weight_part(buffer_id, chunk, handle)

    def _keep_weight_part(self, buffer_id, chunk, handle):
        self.slots[buffer_id].weight_part = handle
        if not handle.split:  # fell back to a full backward: the weight gradients are in already
            self._weight_gradients_done(chunk)

    def _exec_backward_weight(self, buffer_id, chunk, micro_batch):
        slot = self.slots[buffer_id]
        handle, slot.weight_part = slot.weight_part, None
        with self._timed(*_BACKWARD_TIMERS):
            before = self._grad_versions(chunk)
            handle.weight_part()
            self._weight_gradients_done(chunk, before)

    def _backward_steps(self, buffer_id, chunk, micro_batch, split: bool):
        """One micro-batch's backward through ``chunk`` as steps (a generator): input gradients now,
        weight gradients kept in the returned handle when ``split`` (``handle.weight_part()`` later)."""
        slot, downstream = self.slots[buffer_id], self._downstream(chunk, micro_batch)
        if downstream is None:  # loss stage: every micro-batch weighs 1/M in the batch mean
            outputs, grads = self._scale_loss(slot.loss / self._batch_count), None
            slot.loss = None
        else:
            if self._local(downstream):
                grads = self.handoffs.grads.pop((chunk, micro_batch))
            else:
                slot.grad_recv = self._wait(slot.grad_recv, "the gradient", chunk, micro_batch, downstream)
                grads = slot.output_grads
            outputs, grads = _with_grads(slot.outputs if slot.output_edges is None else slot.output_edges, grads)
            slot.output_edges = None
        inputs = _as_tuple(slot.inputs)
        tape, slot.tape = slot.tape, None
        if tape is not None:
            input_grads, handle = yield from steps.backward_steps(tape, outputs, grads, split=split)
        else:
            params = self.module.chunk_parameters(chunk)
            _check_differentiable(outputs, params, self.stage_id, chunk)
            handle = SplitBackward.input_part(outputs, grads, inputs, params, split=split, set_input_grads=False)
            input_grads = handle.take_input_grads()
        del outputs, grads
        input_grads = tuple(
            torch.zeros_like(t) if g is None else g for t, g in zip(inputs, input_grads) if t.is_floating_point())
        upstream = self._upstream(chunk, micro_batch)
        if self._local(upstream):
            self.handoffs.grads[upstream[1], micro_batch] = input_grads
        elif upstream is not None:
            slot.input_grads = input_grads
        slot.outputs = slot.output_grads = None
        if upstream is None or self._local(upstream):
            slot.inputs = None
        return handle

    def _exec_overlapped_forward_backward(self, **pair):
        """DualPipe's overlapped pair: with phased (MoE) chunks, each all-to-all of one micro-batch runs
        while the other computes. The backward leads (Megatron-core's order: its first step launches the
        combine's gradient all-to-all, which then hides under the forward's attention). Chunks without
        phases, or ``dualpipe.overlap_moe_a2a: false``, run the two halves one after the other."""
        with self._timed(*_BACKWARD_TIMERS):  # wall_clock_breakdown: a pair counts as backward time
            self._pair(instructions.OverlappedForwardBackward(**pair))

    def _pair(self, pair: instructions.OverlappedForwardBackward):
        split = pair.backward_op == "I" and self._split
        backward = self._backward_steps(pair.backward_buffer, pair.backward_chunk, pair.backward_micro_batch, split)
        forward = self._forward_steps(pair.forward_buffer, pair.forward_chunk, pair.forward_micro_batch)
        labels = (f"B{pair.backward_micro_batch}.{pair.backward_chunk}",
                  f"F{pair.forward_micro_batch}.{pair.forward_chunk}")
        # both orders record, to compare them
        recorded = dict(events=self.phase_events, device=self.device, clock=self.step_clock)
        if self.dualpipe.overlap_moe_a2a:
            handle, _ = steps.interleave(backward, forward, labels=labels, **recorded)
        else:  # the plain order: the whole forward, then the whole backward
            steps.run(forward, label=labels[1], **recorded)
            handle = steps.run(backward, label=labels[0], **recorded)
        if pair.backward_op == "I":
            self._keep_weight_part(pair.backward_buffer, pair.backward_chunk, handle)
        else:
            self._weight_gradients_done(pair.backward_chunk)

    def _exec_send_activations(self, buffer_id, chunk, micro_batch, peer):
        PointToPoint._exec_send_activations(self, buffer_id, chunk, micro_batch, peer)
        self._handed_on(buffer_id)

    def _handed_on(self, buffer_id):
        """The stage outputs are on their way (sent, or handed to this rank's other chunk): keep only what the
        backward needs, not the tensors (autograd keeps an output only if an op saved it). ``output_edges``
        holds where each floating-point output's gradient enters the graph; ``outputs`` keeps their shapes,
        dtypes and devices as one-element expanded tensors, which is all the gradient's receive reads."""
        slot = self.slots[buffer_id]
        if not torch.is_grad_enabled() or slot.outputs is None:
            return
        outputs = _as_tuple(slot.outputs)
        slot.output_edges = tuple(
            get_gradient_edge(t) if t.requires_grad else None for t in outputs if t.is_floating_point())
        shells = tuple(t.new_empty(()).expand(t.shape) for t in outputs)
        slot.outputs = shells if isinstance(slot.outputs, (tuple, list)) else shells[0]

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        instructions.LoadMicroBatch: _exec_load_micro_batch,
        instructions.ForwardPass: _exec_forward_pass,
        instructions.BackwardPass: _exec_backward_pass,
        instructions.BackwardInput: _exec_backward_input,
        instructions.BackwardWeight: _exec_backward_weight,
        instructions.OverlappedForwardBackward: _exec_overlapped_forward_backward,
        instructions.SendActivation: _exec_send_activations,
        instructions.RecvActivation: PointToPoint._exec_recv_activations,
        instructions.SendGrad: PointToPoint._exec_send_grads,
        instructions.RecvGrad: PointToPoint._exec_recv_grads,
        instructions.CommitP2P: PointToPoint._exec_commit_p2p,
        instructions.ReduceMirrorGrads: GradientReductions._exec_reduce_mirror_grads,
        instructions.ReduceTiedGrads: GradientReductions._exec_reduce_tied_grads,
        instructions.ReduceGrads: GradientReductions._exec_reduce_grads,
    }


def check_recompute_islands(names, module) -> frozenset:
    """``dualpipe.recompute_islands`` checked against the islands the model's layers declare (a phased layer
    class lists its islands in ``ISLANDS``; a plain layer in a phased chunk is one island named after its
    class). Refused if a name is unknown, or if no layer is phased (recomputation applies inside phased
    chunks; elsewhere DeepSpeed's ``activation_checkpoint_interval`` does it)."""
    if not names:
        return frozenset()
    classes = {_layer_class(layer) for layer in module._layer_specs}
    phased = [c for c in classes if hasattr(c, "forward_steps")]
    if not phased:
        raise ValueError(f"dualpipe.recompute_islands={list(names)}: no layer of this model runs as phases (none "
                         f"defines forward_steps), so there are no islands to recompute; use DeepSpeed's "
                         f"activation_checkpoint_interval for plain layers")
    if any(getattr(c, "ISLANDS", None) is None for c in phased):
        return frozenset(names)  # a phased layer that does not say which islands it has: names cannot be checked
    known = {name for c in phased for name in c.ISLANDS} | {c.__name__ for c in classes if c not in phased}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"dualpipe.recompute_islands names {unknown}, which no layer of this model has; its "
                         f"islands: {', '.join(sorted(known))}")
    return frozenset(names)


def _layer_class(layer):
    spec_class = getattr(layer, "typename", None)  # LayerSpec / TiedLayerSpec
    return spec_class if isinstance(spec_class, type) else type(layer)


def _check_differentiable(outputs, params, stage: int, chunk: int) -> None:
    """A chunk with trainable parameters whose outputs carry no gradient would silently never train them (and
    its rank would then skip gradient collectives its peers run): refuse, as DeepSpeed's 1F1B fails there."""
    if params and not any(
            isinstance(t, GradientEdge) or (torch.is_tensor(t) and t.requires_grad) for t in _as_tuple(outputs)):
        raise RuntimeError(f"pipeline rank {stage}, chunk {chunk}: no output of this chunk requires grad, so its "
                           f"{len(params)} trainable parameters would get no gradient. With activation "
                           f"checkpointing, a layer whose inputs need no gradient (token ids) must not be "
                           f"checkpointed: DeepSpeed's reentrant checkpoint cuts its parameters off (set "
                           f"checkpointable_layers, or pipeline.use_reentrant=false)")


def _reduce_outputs(outputs, reduce_output):
    """``eval_batch(compute_loss=False)``'s result on this rank: the mean (or, with ``reduce_output=None``, the list)
    of the outputs its loss stages computed; ``None`` on a rank that holds no loss stage."""
    if not outputs:
        return None
    if reduce_output is None:
        return outputs
    if reduce_output != "avg":
        raise ValueError(f"eval_batch: reduce_output must be 'avg' or None, got {reduce_output!r}")
    stacked = [torch.stack(parts).float().mean(0) for parts in zip(*map(_as_tuple, outputs))]
    return stacked[0] if torch.is_tensor(outputs[0]) else tuple(stacked)


def _detached(outputs):
    """The tensors a next chunk on the same rank starts from: cut from this chunk's graph."""
    tensors = tuple(t.detach().requires_grad_(t.is_floating_point() and torch.is_grad_enabled())
                    for t in _as_tuple(outputs))
    return tensors if isinstance(outputs, (tuple, list)) else tensors[0]


def _with_grads(outputs, grads):
    """The floating-point outputs (or their ``GradientEdge``\\ s, ``None`` where one needs no gradient) and their
    gradients, pairwise (integer outputs carry no gradient)."""
    outs = [t for t in _as_tuple(outputs) if isinstance(t, GradientEdge) or t is None or t.is_floating_point()]
    grads = _as_tuple(grads)
    if len(outs) != len(grads):
        raise RuntimeError(f"{len(outs)} floating-point outputs but {len(grads)} gradients received")
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None]
    return tuple(o for o, _ in pairs), tuple(g for _, g in pairs)
