"""A profile (``dualpipe.profile_step``, format in docs/advise.md) read into what one micro-batch costs
through the whole model, and what a step costs besides (:class:`ModelCosts`)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepspeed_dualpipe.schedule import get_spec
from deepspeed_dualpipe.tools.advise.memory import memory_fit

FORMAT = "deepspeed-dualpipe-profile/1"
# Once per step whatever M: gradient reductions and the optimizer step (both grow with the parameters a rank holds)
_FIXED = ("ReduceMirrorGrads", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep")


def _mean(values: Sequence[float]) -> Optional[float]:
    values = list(values)
    return statistics.fmean(values) if values else None


@dataclass
class ModelCosts:
    """One micro-batch through the whole model, and what a step costs besides, from a profile (seconds, bytes).

    ``clock`` says how computations were timed: ``"cpu"`` (a CPU job: the computing thread's CPU seconds, the
    work itself, whatever else the cores were doing) or ``"wall"`` (a job on accelerators: wall seconds,
    all-to-all waits of computations run alone included)."""

    schedule: str
    stages: int
    micro_batches: int
    data_parallel: int
    clock: str
    forward_s: float
    backward_s: float  # a backward as a schedule that splits it pays: I + W (a full one where a stage cannot split)
    weight_s: float
    weight_measured: bool  # False: the profiled schedule never split a backward; W = B/2 and I + W = B are assumed
    full_backward_s: float  # a backward run whole (B), as 1F1B and interleaved 1F1B run them
    full_measured: bool  # False: no stage ran both kinds (a ZB-V profile), B = I + W is assumed
    a2a_forward_s: float  # wall seconds of all-to-all in the forwards (and backwards) of one micro-batch
    a2a_backward_s: float
    a2a_per_call_s: float
    moe_layers: float  # MoE layers of the whole model (two all-to-alls per forward each)
    serial_s: float  # per rank and step, besides computing and waiting: posting, loading, reductions, optimizer
    serial_fixed_s: float  # the part of it that does not grow with M: the reductions and the optimizer step
    work_s: Optional[float]  # CPU jobs: CPU seconds of all ranks in the step (communication threads included)
    work_fixed_s: Optional[float]
    effective_cores: Optional[float]  # CPU jobs: the cores the ranks got together (their CPU seconds / step time)
    activation_bytes: Optional[float]  # one micro-batch's activations through the whole model
    stage_activation_bytes: List[float]  # the same per stage of the profiled cut (empty without memory samples)
    memory_base_bytes: Optional[float]  # held besides them at instruction ends (received buffers, ...)
    memory_transient_bytes: Optional[float]  # above that inside instructions (an operation's temporaries)
    parameter_bytes: float  # the model's parameters once (this data-parallel rank's share of the experts)
    measured_step_s: float  # the profiled step as train_batch took it (slowest rank)


def load_profile(path) -> dict:
    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the profile {path}: {error}") from error
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise ValueError(f"{path} is not a profile of format {FORMAT!r} (written by dualpipe.profile_step)")
    return profile


def backward_costs(ranks, table: str, layout):
    """``(split, full, full measured)``: one chunk's backward as a splitting schedule pays it (I + W) and run
    whole (B), each the mean over model stages, or None without any backward run alone (pairs are left out).

    On CPU two autograd passes cost more than one (on the demo model I + W is 1.3 to 1.5 times B): where
    some stage ran both kinds, the full backward of a stage that only split is its I + W over that ratio;
    where none did, B = I + W is assumed (``full measured`` False). A stage that cannot split (its input needs
    no gradient) runs whole in every schedule."""
    by_stage: Dict[int, Dict[str, List[float]]] = {}
    for r in ranks:
        for key, values in r[table].items():
            kind, *chunks = key.split(":")
            if kind in ("B", "I", "W") and len(chunks) == 1:
                stage = layout.model_stage(r["pipeline_rank"], int(chunks[0]))
                by_stage.setdefault(stage, {}).setdefault(kind, []).extend(values)
    full = {s: _mean(d["B"]) for s, d in by_stage.items() if d.get("B")}
    split = {s: _mean(d["I"]) + _mean(d["W"]) for s, d in by_stage.items() if d.get("I") and d.get("W")}
    if not (full or split):
        return None
    ratio = _mean([split[s] / full[s] for s in split if full.get(s)])
    stages = sorted(set(full) | set(split))
    return (_mean(split.get(s, full.get(s)) for s in stages),
            _mean(full[s] if s in full else split[s] / (ratio or 1.0) for s in stages), ratio is not None or not split)


def combine(primary: ModelCosts, others: Sequence[ModelCosts]) -> ModelCosts:
    """``primary`` with what it could not show filled in from profiles of other schedules of the same model: a
    full backward from one whose stages ran both kinds (or only whole ones), a split one (I + W, W) from one
    that split. Each is scaled by the two profiles' forwards, so that a machine faster in one run cancels."""
    m = primary
    for o in others:
        if o.stages != m.stages or o.data_parallel != m.data_parallel or o.clock != m.clock:
            raise ValueError(f"profiles of different runs: {m.schedule} (P={m.stages}, data parallel "
                             f"{m.data_parallel}, {m.clock} time) and {o.schedule} (P={o.stages}, data parallel "
                             f"{o.data_parallel}, {o.clock} time)")
        scale = m.forward_s / o.forward_s
        if not m.full_measured and o.full_measured:
            m = replace(m, full_backward_s=o.full_backward_s * scale, full_measured=True)
        if not m.weight_measured and o.weight_measured:
            m = replace(m, backward_s=o.backward_s * scale, weight_s=o.weight_s * scale, weight_measured=True)
    return m


def model_costs(profile: dict) -> ModelCosts:
    """What :class:`ModelCosts` a profile implies (see the module docstring)."""
    schedule, P, M = profile["schedule"], profile["stages"], profile["micro_batches"]
    layout = get_spec(schedule).layout(P, M)
    K = layout.model_stages
    ranks = profile["ranks"]
    clock = "cpu" if profile.get("device", "cpu") == "cpu" and all("other_cpu_s" in r for r in ranks) else "wall"
    table = "compute_cpu_s" if clock == "cpu" else "compute_s"

    def samples(table: str, kind: str) -> List[float]:
        return [v for r in ranks for key, values in r[table].items() if key.split(":")[0] == kind for v in values]

    F = _mean(samples(table, "F"))
    backwards = backward_costs(ranks, table, layout)
    if F is None or backwards is None:
        raise ValueError("the profile has no forward or no backward run alone: profile a schedule such as zbv, "
                         "zb1p or interleaved-1f1b")
    B, B_full, full_measured = backwards
    W = _mean(samples(table, "W"))
    weight_measured = W is not None
    if W is None:
        W = B / 2
    a2a_f, a2a_b = _mean(samples("a2a_s", "F")) or 0.0, _mean(samples("a2a_s", "B")) or 0.0
    calls_f = _mean(samples("a2a_count", "F")) or 0.0
    calls = sum(samples("a2a_count", "F")) + sum(samples("a2a_count", "B"))
    per_call = (sum(samples("a2a_s", "F")) + sum(samples("a2a_s", "B"))) / calls if calls else 0.0
    fixed = [sum(r["other_cpu_s" if clock == "cpu" else "other_s"].get(n, 0.0) for n in _FIXED) for r in ranks]
    if clock == "cpu":
        serial = [r["cpu_s"] - sum(sum(v) for v in r["compute_cpu_s"].values()) for r in ranks]
    else:
        serial = [r["wall_s"] - r["busy_s"] - r["waited_s"] for r in ranks]
    work = work_fixed = cores = None
    wall = max(r["wall_s"] for r in ranks)
    if clock == "cpu":
        work, work_fixed = sum(r["process_cpu_s"] for r in ranks), sum(fixed)
        cores = work / wall
    dp0 = [r for r in ranks if r["data_parallel_rank"] == 0]
    parameters = sum(r["parameter_bytes"] for r in dp0) / layout.param_copies
    activation = memory_base = memory_transient = None
    stages: List[float] = []
    fits = [f for f in (memory_fit(schedule, P, M, r) for r in ranks) if f is not None]
    if fits:  # bytes = base + per stage, bytes x live micro-batches, at instruction ends; the rest is transient
        per_stage: Dict[int, List[float]] = {}
        for units, _, _ in fits:
            for stage, unit in units.items():
                per_stage.setdefault(stage, []).append(unit)
        stages = [_mean(per_stage.get(s, [0.0])) for s in range(K)]
        activation = sum(stages)
        memory_base, memory_transient = _mean(b for _, b, _ in fits), _mean(t for _, _, t in fits)
    return ModelCosts(schedule=schedule,
                      stages=P,
                      micro_batches=M,
                      data_parallel=profile.get("data_parallel", 1),
                      clock=clock,
                      forward_s=F * K,
                      backward_s=B * K,
                      weight_s=W * K,
                      weight_measured=weight_measured,
                      full_backward_s=B_full * K,
                      full_measured=full_measured,
                      a2a_forward_s=a2a_f * K,
                      a2a_backward_s=a2a_b * K,
                      a2a_per_call_s=per_call,
                      moe_layers=calls_f * K / 2,
                      serial_s=_mean(serial),
                      serial_fixed_s=min(_mean(fixed), _mean(serial)),
                      work_s=work,
                      work_fixed_s=work_fixed,
                      effective_cores=cores,
                      activation_bytes=activation,
                      stage_activation_bytes=stages,
                      memory_base_bytes=memory_base,
                      memory_transient_bytes=memory_transient,
                      parameter_bytes=parameters,
                      measured_step_s=wall)
