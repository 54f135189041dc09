"""``DualPipeModule``: a ``PipelineModule`` cut into chunks for the plugin's schedules.

- ``zb1p``: as DeepSpeed's ``PipelineModule``: P stages, rank r builds stage r.
- ``dualpipe``: P stages; rank r builds stage r (chunk 0) and stage P-1-r (chunk 1), so
  every stage lives on a mirror pair of ranks. Both copies start identical (a broadcast
  within the pair) and stay identical: gradients are summed across the pair.
- ``dualpipev``, ``zbv``: 2P stages; rank r builds stage r (chunk 0) and stage 2P-1-r (chunk 1).
- ``interleaved-1f1b``: 2P stages; rank r builds stage r (chunk 0) and stage P+r (chunk 1). Its two
  chunks are not neighbours: rank P-1's chunk 0 feeds rank 0's chunk 1 over the network.

Layers keep DeepSpeed's names (``str(layer_index)``), so a stage's parameters have the
same names on both ranks of a mirror pair and in DeepSpeed's checkpoint layout.
"""

import functools
import inspect
from contextlib import contextmanager
from typing import List, Tuple

import torch
from deepspeed import comm as dist
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec

from deepspeed_dualpipe.runtime.groups import mirror_rank_lists
from deepspeed_dualpipe.schedule import PLUGIN_SCHEDULES, Layout, LayoutKind, get_spec


class DualPipeModule(PipelineModule):
    """A :class:`deepspeed.pipe.PipelineModule` for ``schedule``, one of the plugin's schedules
    (:data:`~deepspeed_dualpipe.schedule.PLUGIN_SCHEDULES`).

    Takes the same arguments as ``PipelineModule`` plus ``schedule``.
    """

    def __init__(self, layers, num_stages=None, topology=None, loss_fn=None, *args, schedule="dualpipe", **kwargs):
        if schedule not in PLUGIN_SCHEDULES:
            raise ValueError(f"DualPipeModule runs the plugin's schedules {', '.join(PLUGIN_SCHEDULES)}; got "
                             f"schedule={schedule!r} (DeepSpeed's own PipelineModule runs 1f1b and ds-dualpipev)")
        self.schedule = schedule
        self.partition_method = _argument(PipelineModule.__init__, "partition_method", args, kwargs, layers,
                                          num_stages, topology, loss_fn)
        # Explicitly PipelineModule's: as the base of a user's class rebuilt in chunks (integration.chunked),
        # super() would reach the user's own __init__.
        PipelineModule.__init__(self, layers, num_stages, topology, loss_fn, *args, **kwargs)
        self.mirror_group, self.holder_group = self._mirror_groups()
        self._synchronize_mirrors()

    @property
    def layout_kind(self) -> LayoutKind:
        return get_spec(self.schedule).layout_kind

    # ----- partitioning --------------------------------------------------------------------------
    def _partition_layers(self, method="uniform"):
        ranks = self.num_stages
        model_stages = Layout(self.layout_kind, ranks, 1).model_stages
        if self._num_layers < model_stages:
            raise ValueError(f"schedule {self.schedule!r} cuts the model into {model_stages} stages on {ranks} "
                             f"pipeline ranks, but the model has only {self._num_layers} layers; use more layers or "
                             f"fewer stages")
        if method.lower() == "uniform" and self._num_layers % model_stages:
            raise ValueError(f"partition_method='uniform' cannot split {self._num_layers} layers evenly into "
                             f"{model_stages} stages (schedule {self.schedule!r}); use a multiple of {model_stages} "
                             f"layers or partition_method='parameters'")
        self.num_stages = model_stages
        try:
            super()._partition_layers(method)
        finally:
            self.num_stages = ranks
        self.chunk_bounds: List[Tuple[int, int]] = [(self.parts[s], self.parts[s + 1]) for s in self._chunk_stages()]

    def _chunk_stages(self) -> List[int]:
        layout = Layout(self.layout_kind, self.num_stages, 1)
        return [layout.model_stage(self.stage_id, c) for c in range(layout.chunks_per_rank)]

    def stage_owner(self, layer_idx):
        """The pipeline rank that holds ``layer_idx`` as its chunk 0 (or its only copy)."""
        stage = next(s for s in range(len(self.parts) - 1) if self.parts[s] <= layer_idx < self.parts[s + 1])
        if self.layout_kind is LayoutKind.V:
            return min(stage, 2 * self.num_stages - 1 - stage)
        if self.layout_kind is LayoutKind.INTERLEAVED:
            return stage % self.num_stages
        return stage

    # ----- building ------------------------------------------------------------------------------
    def _build(self):
        self.chunk_funcs: List[list] = []
        for start, stop in self.chunk_bounds:
            self.forward_funcs = []
            self._set_bounds(start, stop)
            super()._build()
            self.chunk_funcs.append(self.forward_funcs)
        self.chunk_checkpointable: List[list] = [[] for _ in self.chunk_funcs]
        self.activate_chunk(0)
        self._mark_replicas()

    def chunk_parameters(self, chunk: int) -> List[torch.nn.Parameter]:
        """The trainable parameters that ``chunk``'s layers use (tied modules included)."""
        seen, params = set(), []
        for func in self.chunk_funcs[chunk]:
            module = func.args[0] if hasattr(func, "args") and func.args else func
            if isinstance(module, torch.nn.Module):
                for p in module.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        return params

    def chunk_is_phased(self, chunk: int) -> bool:
        """True if one of ``chunk``'s layers splits its forward into phases (``forward_steps``, e.g. an
        MoE block): the engine then runs the chunk phase by phase, overlapping all-to-alls in pairs."""
        return any(hasattr(func, "forward_steps") for func in self.chunk_funcs[chunk])

    def activate_chunk(self, chunk: int) -> None:
        """Make ``forward()`` run ``chunk``'s layers."""
        self.active_chunk = chunk
        self.forward_funcs = self.chunk_funcs[chunk]
        self.is_checkpointable_results = self.chunk_checkpointable[chunk]
        self._local_start, self._local_stop = self.chunk_bounds[chunk]

    def forward(self, forward_input):
        """DeepSpeed's ``PipelineModule.forward`` on the active chunk (layer seeds, activation checkpointing), with
        the chunk's layers bound now: a recompute in the backward runs this chunk whichever is active then."""
        self.micro_offset += 1
        funcs, first, offset = list(self.forward_funcs), self._local_start, self.micro_offset + 1

        def exec_range_func(start, end):

            def exec_func(*inputs):
                x = inputs[0] if len(inputs) == 1 else inputs  # one tensor travels unwrapped
                for idx, layer in enumerate(funcs[start:end]):
                    self.curr_layer = idx + first  # as DeepSpeed counts it (per range), for the same seeds
                    if self.seed_layers:
                        seed = self.base_seed * offset + self.curr_layer
                        self.seed_fn(seed) if self.seed_fn else ds_utils.set_random_seed(seed)
                    x = layer(x)
                return x

            return exec_func

        interval = self.activation_checkpoint_interval
        if interval == 0:
            return exec_range_func(0, len(funcs))(forward_input)
        x = forward_input
        for start, checkpointable in zip(range(0, len(funcs), interval), self.is_checkpointable_results):
            end = min(start + interval, len(funcs))
            x = x if isinstance(x, tuple) else (x, )
            run = exec_range_func(start, end)
            x = self.activation_checkpoint_func(run, *x) if checkpointable else run(*x)
        return x

    def compile(self, *args, **kwargs):
        """``torch.compile`` the layers of every chunk (``PipelineModule.compile`` reaches the active chunk only).
        A tied layer's forward (a ``functools.partial`` of its module) stays a partial of that module, so the
        chunk's parameters are still found (:meth:`chunk_parameters`)."""
        for funcs in self.chunk_funcs:
            for index, layer in enumerate(funcs):
                if isinstance(layer, torch.nn.Module):
                    layer.compile(*args, **kwargs)
                elif isinstance(layer, functools.partial):
                    funcs[index] = functools.partial(torch.compile(layer.func, *args, **kwargs), *layer.args,
                                                     **layer.keywords)
                else:
                    funcs[index] = torch.compile(layer, *args, **kwargs)

    @contextmanager
    def chunk(self, chunk: int):
        previous = self.active_chunk
        self.activate_chunk(chunk)
        try:
            yield self
        finally:
            self.activate_chunk(previous)

    def _precompute_checkpointable_values(self):
        for c in range(len(self.chunk_funcs)):
            self.activate_chunk(c)
            self.is_checkpointable_results_interval = None  # cached per interval, not per chunk
            super()._precompute_checkpointable_values()
            self.chunk_checkpointable[c] = self.is_checkpointable_results
        self.activate_chunk(0)

    # ----- checkpoints: DeepSpeed's layer files, indexed by global layer -------------------------
    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        """Write ``layer_XX-model_states.pt`` for this rank's layers, as ``PipelineModule`` does.

        Files are named by global layer index, so a checkpoint written under one schedule loads
        under another. Under DualPipe each stage is written once: by the rank that holds it as
        chunk 0.
        """
        chunks = [0] if self.layout_kind is LayoutKind.BIDIRECTIONAL else range(len(self.chunk_funcs))
        for c in chunks:
            with self.chunk(c):
                super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params)

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        for c in range(len(self.chunk_funcs)):
            with self.chunk(c):
                super().load_state_dir(load_dir, checkpoint_engine, strict)

    # ----- tied layers and mirror copies ---------------------------------------------------------
    def _index_tied_modules(self):
        if self.layout_kind is not LayoutKind.BIDIRECTIONAL:
            return super()._index_tied_modules()
        # Under DualPipe a tied module shared by stages s and P-1-s lives on both ranks of that
        # mirror pair, and the mirror reduction already sums its gradients: no tied group.
        P = self.num_stages
        for key in sorted({s.key for s in self._layer_specs if isinstance(s, TiedLayerSpec)}):
            stages = {
                self.stage_owner(i)
                for i, s in enumerate(self._layer_specs) if isinstance(s, TiedLayerSpec) and s.key == key
            }
            pairs = {min(s, P - 1 - s) for s in stages}
            if len(pairs) > 1:
                raise ValueError(f"dualpipe supports tied layers only within one mirror pair of stages (s and P-1-s, "
                                 f"such as embedding and output head); tied key {key!r} spans stages "
                                 f"{sorted(stages)}")
        return {}

    def _synchronize_tied_weights(self):
        with torch.no_grad():  # an in-place broadcast into a parameter must not enter autograd
            super()._synchronize_tied_weights()

    def _mirror_groups(self):
        """For DualPipe: the process group of this rank and its mirror (same coordinates on every other axis), and
        the group of every holder of this rank's two stages (the mirror pair in every data-parallel replica); else
        ``None``s. ``new_group`` is a collective: every rank creates every group, with the lists of
        :func:`mirror_rank_lists`, which depend on the topology alone."""
        if self.layout_kind is not LayoutKind.BIDIRECTIONAL:
            return None, None
        pairs, holder_lists = mirror_rank_lists(self._topo)
        mirror = holders = None
        for ranks in pairs:
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                mirror = group
        if self._grid.data_parallel_size == 1:
            return mirror, mirror  # the pair holds the only two copies
        for ranks in holder_lists:
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                holders = group
        return mirror, holders

    def mirror_peer(self) -> int:
        return self._grid.stage_to_global(stage_id=self.num_stages - 1 - self.stage_id)

    def named_mirror_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        """Parameters and buffers, by name: the same list, in the same order, on both ranks of a pair."""
        return sorted(list(self.named_parameters()) + list(self.named_buffers()), key=lambda item: item[0])

    def _synchronize_mirrors(self):
        """Start both copies of every stage from the same values: the lower rank's."""
        if self.mirror_group is None:
            return
        source = self._grid.stage_to_global(stage_id=min(self.stage_id, self.num_stages - 1 - self.stage_id))
        with torch.no_grad():
            for _, tensor in self.named_mirror_tensors():
                dist.broadcast(tensor, src=source, group=self.mirror_group)

    def _mark_replicas(self):
        """Count each parameter once in global norms (gradient clipping, overflow checks)."""
        for p in self.parameters():
            p.ds_pipe_replicated = False
        if self.layout_kind is not LayoutKind.BIDIRECTIONAL:
            return
        upper = self.stage_id >= self.num_stages // 2
        chunk0 = {id(p) for p in self.chunk_parameters(0)}
        for p in self.parameters():
            # chunk 1 holds the second copy of a stage; a module shared by both chunks (tied
            # embedding/head) is the second copy on the upper rank of the pair.
            if id(p) not in chunk0 or (upper and p in set(self.tied_modules.parameters())):
                p.ds_pipe_replicated = True


def _argument(function, name, args, kwargs, *leading):
    """The value ``name`` takes in a call ``function(self, *leading, *args, **kwargs)``."""
    bound = inspect.signature(function).bind(None, *leading, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments[name]
