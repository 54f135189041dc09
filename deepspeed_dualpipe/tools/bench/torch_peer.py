"""The peer in the bench: ``torch.distributed.pipelining``'s own schedules on the same sleeping layers.

Each peer row runs torch's schedule class over the bench's layers (:mod:`.layers`), cut into torch's
model stages, on the pipeline group of the plugin's engines (so the same ranks, the same
expert-parallel groups and the same emulated wire), timed step by step between the plugin's runs.

torch splits the backward the way the layers are built for: ``stage_backward_input`` walks only the
path to the stage inputs (``InputSleep`` sleeps ``B - W``) and ``stage_backward_weight`` only the path to
the weights (``WeightSleep`` sleeps ``W``). torch runs a first stage's input part inside its weight part
(there is no input gradient to send), as it does for any model.

MoE layers (``--a2a``/``--a2a-wire``) run their all-to-alls inside the layer, blocking: torch 2.13's
``ScheduleDualPipeV`` runs an ``OVERLAP_F_B`` pair's forward and backward one after the other unless
the user registers a callback (``register_custom_function(OVERLAP_F_B, ...)``) that overlaps them
itself; torch ships no such callback for MoE, so the peer runs none: its all-to-alls are not hidden.

Instructions are timed by wrapping each stage's ``forward_one_chunk``, ``backward_one_chunk`` and
``backward_weight_one_chunk``: torch waits for its receives before it calls them, so the records hold
compute only (``waited`` is 0), under the class names :mod:`.measure` counts as compute.
Activation memory is not measured for the peer (its rows show ``-``).
"""

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from deepspeed_dualpipe.tools.bench import layers as L

# plugin schedule -> (torch class, model stages per rank, stage placement). The simulator's row for a
# peer is the plugin schedule's (its all-to-alls never overlapped).
PEERS: Dict[str, Tuple[str, int, str]] = {
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "zb1p": ("ScheduleInterleavedZeroBubble", 1, "loop"),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}

LABEL_PREFIX = "torch "


def available(names: List[str]) -> List[str]:
    """The schedules among ``names`` that this torch has a peer for, in order."""
    try:
        from torch.distributed.pipelining import schedules
    except ImportError:
        return []
    return [n for n in names if n in PEERS and hasattr(schedules, PEERS[n][0])]


def peer_label(schedule: str) -> str:
    return LABEL_PREFIX + schedule


# ----- timing records, under the class names measure.COMPUTE knows ---------------------------
class ForwardPass:
    pass


class BackwardPass:
    pass


class BackwardInput:
    pass


class BackwardWeight:
    pass


@dataclass
class _Item:
    instruction: object
    start: float
    end: float
    waited: float = 0.0


def _timed(trace: List[_Item], fn, kind, kind_if_split=None):
    """``fn`` recording each call's span in ``trace``; ``kind_if_split`` when called with
    ``full_backward=False`` (torch's input part)."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        split = kind_if_split is not None and kwargs.get("full_backward", True) is False
        trace.append(_Item((kind_if_split if split else kind)(), start, time.perf_counter()))
        return result

    return wrapper


def _stage_indices(rank: int, stages: int, per_rank: int, placement: str) -> List[int]:
    if placement == "v":
        return [rank, 2 * stages - 1 - rank]
    return [rank + k * stages for k in range(per_rank)]


def _make_layer(spec):
    if spec.a2a_bytes:
        layer = L.SleepMoELayer(spec.F, spec.B, spec.W, spec.a2a_bytes, ep_size=2)
        layer.set_deepspeed_parallelism()  # joins the expert-parallel group the engines made
        return layer
    return L.SleepLayer(spec.F, spec.B, spec.W)


class TorchPeer:
    """torch's schedule for one row, on this rank; quacks like the engine :func:`rank._step` times
    (``train_batch``, ``trace``)."""

    def __init__(self, spec, schedule: str, pipe_group, data_group=None):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining import schedules
        cls_name, per_rank, placement = PEERS[schedule]
        model_stages = spec.stages * per_rank
        if spec.layers % model_stages:
            raise ValueError(f"{spec.layers} layers do not split into torch {cls_name}'s {model_stages} stages")
        k = spec.layers // model_stages
        rank = torch.distributed.get_rank(pipe_group)
        self.device = torch.device("cpu")  # torch's stages are built on the CPU, as the bench's CPU rows
        self.trace: List[_Item] = []
        self.modules, stages = [], []
        # torch gives a received input a gradient when the example input has one
        example = torch.zeros(1, spec.width, requires_grad=True)
        for index in _stage_indices(rank, spec.stages, per_rank, placement):
            module = torch.nn.Sequential(*[_make_layer(spec) for _ in range(k)])
            stage = PipelineStage(module,
                                  index,
                                  model_stages,
                                  self.device,
                                  input_args=(example.detach() if index == 0 else example, ),
                                  output_args=(example, ),
                                  group=pipe_group)
            stage.forward_one_chunk = _timed(self.trace, stage.forward_one_chunk, ForwardPass)
            stage.backward_one_chunk = _timed(self.trace, stage.backward_one_chunk, BackwardPass, BackwardInput)
            stage.backward_weight_one_chunk = _timed(self.trace, stage.backward_weight_one_chunk, BackwardWeight)
            self.modules.append(module)
            stages.append(stage)
        cls = getattr(schedules, cls_name)
        single = issubclass(cls, schedules.PipelineScheduleSingle)  # takes one stage, the others a list
        self.schedule = cls(stages[0] if single else stages, n_microbatches=spec.micro_batches, loss_fn=L.mean_loss)
        self.params = [p for m in self.modules for p in m.parameters()]
        self.optimizer = torch.optim.SGD(self.params, lr=0.0)  # as the plugin's runs: the step still runs
        self.data_group = data_group
        torch.manual_seed(0)
        self.batch = torch.randn(spec.micro_batches, spec.width)
        self.target = torch.zeros(spec.micro_batches)

    def train_batch(self, data_iter=None):
        self.optimizer.zero_grad(set_to_none=False)
        self.schedule.step(self.batch, target=self.target)
        if self.data_group is not None:  # data parallelism (the --a2a runs): average the gradients as DeepSpeed does
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            torch.distributed.all_reduce(flat, group=self.data_group)
        self.optimizer.step()


def make_peer(spec, schedule: str, engine) -> TorchPeer:
    """torch's ``schedule`` on the pipeline (and data-parallel) groups of a plugin ``engine`` of this rank."""
    grid = engine.grid
    data_group = grid.get_data_parallel_group() if spec.data_parallel > 1 else None
    return TorchPeer(spec, schedule, grid.get_pipe_parallel_group(), data_group)


def no_memory() -> Dict[str, Optional[int]]:
    """The memory record of a peer row: not measured."""
    return {"peak": None, "high_water": None, "left": None, "parameters": None}
