"""The schedule registry: every schedule the plugin can run, by its config name."""

import functools
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Dict, List, Optional

from deepspeed.runtime.pipe import schedule as ds

from deepspeed_dualpipe.schedule.layout import Layout, LayoutKind
from deepspeed_dualpipe.schedule.base import ProgramSchedule, require_int
from deepspeed_dualpipe.schedule.dualpipe import DualPipeSchedule
from deepspeed_dualpipe.schedule.dualpipev import DualPipeVSchedule
from deepspeed_dualpipe.schedule.interleaved import Interleaved1F1BSchedule
from deepspeed_dualpipe.schedule.interleaved_overlap import OverlappedInterleaved1F1BSchedule
from deepspeed_dualpipe.schedule.plugin_1f1b import Plugin1F1BSchedule
from deepspeed_dualpipe.schedule.zb1p import ZeroBubbleH1Schedule
from deepspeed_dualpipe.schedule.zbv import ZeroBubbleVSchedule


class EngineKind(str, Enum):
    """Which engine runs a schedule."""

    PLUGIN = "plugin"  # the plugin's DualPipeEngine, with a DualPipeModule
    DEEPSPEED = "deepspeed"  # DeepSpeed's own engine, untouched (the baselines)


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule's facts, as everything else reads them. The plugin's schedules state them on their class
    (:class:`~.base.ProgramSchedule`); DeepSpeed's two are described here."""

    name: str
    layout_kind: LayoutKind
    engine: EngineKind
    train: Callable  # (micro_batches, stages, stage_id) -> PipeSchedule
    inference: Callable
    validate: Callable  # (stages, micro_batches) -> None, raises ValueError
    summary: str
    paired: bool = False  # runs overlapped F&B pairs, where dualpipe.overlap_moe_a2a applies
    split_backward: bool = False  # splits backwards into input (I) and weight (W) passes
    table2: Optional[str] = None  # the row of DeepSeek-V3's Table 2 it follows (analysis.simulate.TABLE2)
    torch_inexpressible: Optional[str] = None  # why torch.distributed.pipelining cannot express it, or None

    def layout(self, stages: int, micro_batches: int) -> Layout:
        return Layout(self.layout_kind, stages, micro_batches)

    @property
    def runs_on_plugin_engine(self) -> bool:
        return self.engine is EngineKind.PLUGIN


def _plugin(cls) -> ScheduleSpec:
    """The spec of one of the plugin's schedules: every fact read from its class."""
    return ScheduleSpec(cls.name, cls.layout_kind, EngineKind.PLUGIN, cls, functools.partial(cls, forward_only=True),
                        cls.validate, cls.summary, cls.paired, cls.split_backward, cls.table2, cls.torch_inexpressible)


def _validate_1f1b(stages, micro_batches):
    require_int("stages", stages, 1)
    require_int("micro_batches", micro_batches, 1)


SCHEDULES: Dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in [
        ScheduleSpec("1f1b",
                     LayoutKind.LINEAR,
                     EngineKind.DEEPSPEED,
                     ds.TrainSchedule,
                     ds.InferenceSchedule,
                     _validate_1f1b,
                     "DeepSpeed's own 1F1B TrainSchedule, unchanged (baseline)",
                     table2="1f1b"),
        _plugin(ZeroBubbleH1Schedule),
        _plugin(Interleaved1F1BSchedule),
        _plugin(OverlappedInterleaved1F1BSchedule),
        _plugin(ZeroBubbleVSchedule),
        _plugin(DualPipeSchedule),
        _plugin(DualPipeVSchedule),
        ScheduleSpec("ds-dualpipev", LayoutKind.V, EngineKind.DEEPSPEED, ds.DualPipeVSchedule,
                     functools.partial(ds.DualPipeVSchedule, forward_only=True), DualPipeVSchedule.validate,
                     "DeepSpeed 0.19.8's built-in DualPipeV (baseline: no W split, no overlap)"),
        _plugin(Plugin1F1BSchedule),
    ]
}

# Names by engine and by fact, derived from the registry.
PLUGIN_SCHEDULES = tuple(name for name, spec in SCHEDULES.items() if spec.runs_on_plugin_engine)
DEEPSPEED_SCHEDULES = tuple(name for name, spec in SCHEDULES.items() if not spec.runs_on_plugin_engine)
# Those whose overlapped pairs interleave MoE all-to-alls with the other micro-batch (dualpipe.overlap_moe_a2a).
PAIRED_SCHEDULES = tuple(name for name, spec in SCHEDULES.items() if spec.paired)
# Those torch.distributed.pipelining's action format can express (analysis.torch_format).
TORCH_EXPRESSIBLE = tuple(name for name, spec in SCHEDULES.items() if spec.torch_inexpressible is None)


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
    "SCHEDULES", "PLUGIN_SCHEDULES", "DEEPSPEED_SCHEDULES", "PAIRED_SCHEDULES", "TORCH_EXPRESSIBLE", "EngineKind",
    "ScheduleSpec", "build_schedule", "get_spec", "rank_steps", "ProgramSchedule"
]
