"""The schedule registry: every schedule the plugin can run, by its config name."""

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Dict, List

from deepspeed.runtime.pipe import schedule as ds

from deepspeed_dualpipe.schedule.layout import Layout, LayoutKind
from deepspeed_dualpipe.schedule.base import ProgramSchedule, require_int
from deepspeed_dualpipe.schedule.dualpipe import DualPipeSchedule
from deepspeed_dualpipe.schedule.dualpipev import DualPipeVSchedule
from deepspeed_dualpipe.schedule.interleaved import Interleaved1F1BSchedule
from deepspeed_dualpipe.schedule.interleaved_overlap import OverlappedInterleaved1F1BSchedule
from deepspeed_dualpipe.schedule.zb1p import ZeroBubbleH1Schedule
from deepspeed_dualpipe.schedule.zbv import ZeroBubbleVSchedule


class EngineKind(str, Enum):
    """Which engine runs a schedule."""

    PLUGIN = "plugin"  # the plugin's DualPipeEngine, with a DualPipeModule
    DEEPSPEED = "deepspeed"  # DeepSpeed's own engine, untouched (the baselines)


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    layout_kind: LayoutKind
    engine: EngineKind
    train: Callable  # (micro_batches, stages, stage_id) -> PipeSchedule
    inference: Callable
    validate: Callable  # (stages, micro_batches) -> None, raises ValueError
    summary: str
    overlapped_pairs: bool = False  # runs OverlappedForwardBackward pairs, where dualpipe.overlap_moe_a2a applies

    def layout(self, stages: int, micro_batches: int) -> Layout:
        return Layout(self.layout_kind, stages, micro_batches)

    @property
    def runs_on_plugin_engine(self) -> bool:
        return self.engine is EngineKind.PLUGIN


def _plugin(cls, summary, overlapped_pairs=False):
    return ScheduleSpec(cls.name, cls.layout_kind, EngineKind.PLUGIN, cls, lambda *a: cls(*a, forward_only=True),
                        cls.validate, summary, overlapped_pairs)


def _validate_1f1b(stages, micro_batches):
    require_int("stages", stages, 1)
    require_int("micro_batches", micro_batches, 1)


def _validate_ds_dualpipev(stages, micro_batches):
    DualPipeVSchedule.validate(stages, micro_batches)


SCHEDULES: Dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in [
        ScheduleSpec("1f1b", LayoutKind.LINEAR, EngineKind.DEEPSPEED, ds.TrainSchedule, ds.InferenceSchedule,
                     _validate_1f1b, "DeepSpeed's own 1F1B TrainSchedule, unchanged (baseline)"),
        _plugin(ZeroBubbleH1Schedule, "ZeroBubble ZB-H1: backward split into I and W, W deferred"),
        _plugin(
            Interleaved1F1BSchedule, "Interleaved 1F1B: two virtual stages per rank (r and P+r), as Megatron "
            "and torch.distributed.pipelining"),
        _plugin(OverlappedInterleaved1F1BSchedule, "Interleaved 1F1B whose steady state runs overlapped F&B pairs "
                "(Megatron-core's combined 1F1B for MoE all-to-all overlap; for ablations)",
                overlapped_pairs=True),
        _plugin(ZeroBubbleVSchedule, "ZB-V: zero-bubble V (stages r and 2P-1-r), backward split into I and W"),
        _plugin(DualPipeSchedule, "DualPipe: bidirectional, mirrored chunks, overlapped F&B pairs", True),
        _plugin(DualPipeVSchedule, "DualPipeV: DualPipe cut in half, V-shaped, no duplicated parameters", True),
        ScheduleSpec("ds-dualpipev", LayoutKind.V, EngineKind.DEEPSPEED, ds.DualPipeVSchedule,
                     lambda m, s, i: ds.DualPipeVSchedule(m, s, i, forward_only=True), _validate_ds_dualpipev,
                     "DeepSpeed 0.19.8's built-in DualPipeV (baseline: no W split, no overlap)"),
    ]
}

# Names by engine, derived from the registry.
PLUGIN_SCHEDULES = tuple(name for name, spec in SCHEDULES.items() if spec.runs_on_plugin_engine)
DEEPSPEED_SCHEDULES = tuple(name for name, spec in SCHEDULES.items() if not spec.runs_on_plugin_engine)
# Those whose overlapped pairs interleave MoE all-to-alls with the other micro-batch (dualpipe.overlap_moe_a2a).
PAIRED_SCHEDULES = tuple(name for name, spec in SCHEDULES.items() if spec.overlapped_pairs)


def get_spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def build_schedule(name: str, micro_batches: int, stages: int, stage_id: int, forward_only: bool = False):
    """The DeepSpeed ``PipeSchedule`` that pipeline rank ``stage_id`` runs for schedule ``name``."""
    spec = get_spec(name)
    spec.validate(stages, micro_batches)
    factory = spec.inference if forward_only else spec.train
    return factory(micro_batches, stages, stage_id)


def rank_steps(name: str, stages: int, micro_batches: int, forward_only: bool = False) -> List[List[list]]:
    """Every rank's instruction stream: ``result[rank][step] -> [PipeInstruction, ...]``."""
    return [list(build_schedule(name, micro_batches, stages, r, forward_only).steps()) for r in range(stages)]


__all__ = [
    "SCHEDULES", "PLUGIN_SCHEDULES", "DEEPSPEED_SCHEDULES", "PAIRED_SCHEDULES", "EngineKind", "ScheduleSpec",
    "build_schedule", "get_spec", "rank_steps", "ProgramSchedule"
]
