"""``python -m deepspeed_dualpipe advise PROFILE``: every schedule predicted from one profiled step.

The profile (``dualpipe.profile_step``, format in docs/advise.md) holds what each computation of one step
took on every rank, and the allocator's bytes after each instruction of the next. From it this module
derives what one micro-batch costs through the whole model (:class:`ModelCosts`), cuts that into the chunks
of each schedule in the registry, runs the simulator with those costs, and adds each rank's serial work
(posting, loading, the engine's work per instruction, reductions, the optimizer step), as measured. On CPU,
where ranks share cores, a step also takes at least all ranks' CPU work over the cores they got. Memory:
each stage's bytes per live micro-batch, fitted from the allocator's samples, walked through each rank's
instruction stream. docs/advise.md says how, and how close it comes.

It assumes the profiled costs carry over: per-chunk costs scale with the share of the model a chunk holds,
and the engine's per-activation memory is the plugin's (DeepSpeed's own engines hold less).
"""

import functools
import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepspeed_dualpipe.analysis.simulate import simulate
from deepspeed_dualpipe.analysis.symbolic import Costs
from deepspeed_dualpipe.schedule import PAIRED_SCHEDULES, SCHEDULES, get_spec

FORMAT = "deepspeed-dualpipe-profile/1"
OVERLAPPING = PAIRED_SCHEDULES
TIE = 0.01  # predictions this close (relative) are equally fast  # their pairs interleave MoE all-to-alls (overlap_moe_a2a: true)
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


def _backwards(ranks, table: str, layout):
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
    backwards = _backwards(ranks, table, layout)
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
    fits = [f for f in (_memory_fit(schedule, P, M, r) for r in ranks) if f is not None]
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


@dataclass
class Prediction:
    schedule: str
    micro_batches: int
    step_s: float
    bubble: float  # mean over ranks, fraction of the simulated schedule
    activation_bytes: Optional[int]  # peak per rank
    parameter_bytes: int  # per rank
    costs: Costs

    @property
    def per_micro_batch_s(self) -> float:
        return self.step_s / self.micro_batches

    def memory_bytes(self) -> Optional[int]:
        return None if self.activation_bytes is None else self.activation_bytes + self.parameter_bytes


def instructions(schedule: str, P: int, M: int) -> float:
    """Instructions per rank of a step (the mean over ranks)."""
    from deepspeed_dualpipe.schedule import rank_steps
    return statistics.fmean(sum(len(step) for step in steps) for steps in rank_steps(schedule, P, M))


@functools.lru_cache(maxsize=None)
def splits_backward(schedule: str, P: int) -> bool:
    """Whether ``schedule`` splits backwards into I and W (it runs weight passes of their own)."""
    from deepspeed_dualpipe.schedule import rank_steps
    return any(
        type(ins).__name__ == "BackwardWeight" for steps in rank_steps(schedule, P, 2 * P) for step in steps
        for ins in step)


def backward_s(m: ModelCosts, schedule: str) -> float:
    """One micro-batch's backward through the model as ``schedule`` runs it: split (I + W) or whole (B)."""
    return m.backward_s if splits_backward(schedule, m.stages) else m.full_backward_s


def _compute_work(m: ModelCosts) -> float:
    """CPU seconds of computing in the profiled step, over one data-parallel replica's pipeline."""
    return m.micro_batches * (m.forward_s + backward_s(m, m.schedule))


def live_after_each_instruction(schedule: str, P: int, M: int, rank: int) -> List[List[int]]:
    """Live micro-batch activations of each chunk of ``rank`` after each of its instructions: from a forward to
    the end of its backward (its W, when split), as the verifier counts them."""
    from deepspeed_dualpipe.analysis.events import EventReader, Op
    from deepspeed_dualpipe.schedule import rank_steps
    layout = get_spec(schedule).layout(P, M)
    reader, live, out = EventReader(layout, rank), [0] * layout.chunks_per_rank, []
    for step in rank_steps(schedule, P, M)[rank]:
        for ins in step:
            event = reader.event(ins)
            for part in (event.parts() if isinstance(event, Op) else []):
                live[part.chunk] += 1 if part.op == "F" else -1 if part.op in "BW" else 0
            out.append(list(live))
    return out


def _memory_fit(schedule: str, P: int, M: int, rank: dict):
    """``({model stage: bytes per live micro-batch}, base bytes, transient bytes)`` of one rank: a least-squares
    fit of the allocator's bytes at instruction ends to the live activations of each of its chunks; the
    transient is what the rank's high-water mark adds above those ends. None without the samples."""
    import numpy as np
    used, peak = rank.get("memory_after_bytes") or [], rank.get("activation_peak_bytes")
    r = rank["pipeline_rank"]
    live = live_after_each_instruction(schedule, P, M, r)
    if not used or peak is None or len(used) != len(live):
        return None
    X = np.column_stack([np.array(live, dtype=float), np.ones(len(live))])
    solution, *_ = np.linalg.lstsq(X, np.array(used, dtype=float), rcond=None)
    layout = get_spec(schedule).layout(P, M)
    units = {layout.model_stage(r, c): max(float(u), 0.0) for c, u in enumerate(solution[:-1])}
    return units, float(solution[-1]), max(peak - max(used), 0)


def stage_units(m: ModelCosts, K: int) -> List[float]:
    """Bytes per live micro-batch of each of ``K`` model stages, from the profiled cut's (by overlap of layer
    ranges: a stage of a coarser cut holds the finer cut's stages it covers)."""
    fine = m.stage_activation_bytes
    K0 = len(fine)
    out = []
    for t in range(K):
        lo, hi = t / K, (t + 1) / K
        out.append(sum(u * max(0.0, min(hi, (s + 1) / K0) - max(lo, s / K0)) * K0 for s, u in enumerate(fine)))
    return out


def peak_activation_bytes(m: ModelCosts, schedule: str, P: int, M: int) -> Optional[int]:
    """The largest rank's bytes at any instruction end of ``schedule``, with each stage's bytes per live
    micro-batch, plus the profiled base and transient."""
    if not m.stage_activation_bytes:
        return None
    layout = get_spec(schedule).layout(P, M)
    units = stage_units(m, layout.model_stages)
    peaks = []
    for r in range(P):
        per_chunk = [units[layout.model_stage(r, c)] for c in range(layout.chunks_per_rank)]
        live = live_after_each_instruction(schedule, P, M, r)
        peaks.append(max(sum(u * n for u, n in zip(per_chunk, counts)) for counts in live))
    return int(m.memory_base_bytes + m.memory_transient_bytes + max(peaks))


def chunk_costs(m: ModelCosts, schedule: str, P: int) -> Costs:
    """The simulator's per-chunk costs of ``schedule`` on ``P`` ranks (seconds)."""
    K = get_spec(schedule).layout(P, 2 * P).model_stages
    F, B, W = m.forward_s / K, backward_s(m, schedule) / K, m.weight_s / K
    pair = None
    if m.clock == "wall" and schedule in OVERLAPPING and m.moe_layers and m.a2a_per_call_s:
        # The engine interleaves a pair's two micro-batches at their all-to-alls: replay that with these costs.
        # (Timed in CPU seconds, an all-to-all is no work of the computing thread: nothing to hide.)
        from deepspeed_dualpipe.tools.bench.predict import overlapped_pair
        layers = max(1, round(m.moe_layers / K))
        compute_f = max(F - m.a2a_forward_s / K, 0.0) / layers
        compute_b = max(B - m.a2a_backward_s / K, 0.0) / layers
        pair = overlapped_pair(layers, compute_f, compute_b, m.a2a_per_call_s)
    return Costs(F=F, B=B, W=min(W, B), FB=pair)


def predict(m: ModelCosts, schedule: str, P: int, M: int) -> Prediction:
    """Step time, bubble and memory of ``schedule`` on ``P`` ranks with ``M`` micro-batches.

    The step is the simulated schedule plus each rank's serial work (its part that grows with M scaled, the
    reductions and optimizer scaled with the parameters a rank holds). On CPU it is at least all ranks' work
    over the cores they got in the profiled step: ranks that share cores cannot all compute at once."""
    spec = get_spec(schedule)
    spec.validate(P, M)
    layout = spec.layout(P, M)
    profiled = get_spec(m.schedule).layout(m.stages, m.micro_batches)
    costs = chunk_costs(m, schedule, P)
    sim = simulate(schedule, P, M, costs)
    # Serial work besides computing grows with the instructions a rank runs (posting, loading, the engine's
    # own work per instruction); reductions and the optimizer step with the parameters it holds.
    grows = instructions(schedule, P, M) / instructions(m.schedule, m.stages, m.micro_batches)
    params = layout.param_copies / profiled.param_copies
    serial = m.serial_fixed_s * params + (m.serial_s - m.serial_fixed_s) * grows
    step = sim.makespan + serial
    if m.clock == "cpu" and m.effective_cores:
        compute = m.data_parallel * P * sum(i.end - i.start for t in sim.execution.timelines for i in t) / P
        profiled_compute = m.data_parallel * _compute_work(m)
        other = m.work_s - m.work_fixed_s - profiled_compute
        work = m.work_fixed_s * params + other * grows + compute
        step = max(step, work / m.effective_cores)
    activation = peak_activation_bytes(m, schedule, P, M)
    bubble = statistics.fmean(sim.bubble) / sim.makespan if sim.makespan else 0.0
    per_rank_params = m.parameter_bytes * layout.param_copies / P
    return Prediction(schedule, M, step, bubble, activation, int(per_rank_params), costs)


def micro_batch_range(P: int, profiled: int) -> List[int]:
    return sorted({P, 2 * P, 3 * P, 4 * P, 6 * P, 8 * P, profiled})


def predict_all(m: ModelCosts, schedules: Sequence[str], micro_batches: Sequence[int]) -> List[Prediction]:
    out = []
    for name in schedules:
        for M in micro_batches:
            try:
                out.append(predict(m, name, m.stages, M))
            except ValueError:
                continue  # a shape this schedule does not run
    return out


def recommend(predictions: List[Prediction], budget: Optional[int]) -> Optional[Prediction]:
    """The most micro-batches per second among the predictions whose memory fits ``budget`` (bytes)."""
    fits = [p for p in predictions if budget is None or (p.memory_bytes() or p.parameter_bytes) <= budget]
    if not fits:
        return None
    best = min(p.per_micro_batch_s for p in fits)
    # Predictions within 1% are a tie (the model is not that precise): the least memory wins it.
    tied = [p for p in fits if p.per_micro_batch_s <= best * (1 + TIE)]
    return min(tied, key=lambda p: (p.memory_bytes() or p.parameter_bytes, p.per_micro_batch_s))


# ----- measured runs beside the predictions (docs/advise.md) ------------------------------------------------------


def measured_runs(path) -> Dict[str, dict]:
    """The measured runs beside which to print predictions: ``measured.json`` of ``python -m deepspeed_dualpipe
    measure`` (a file, or the directory holding it), else each run of an ablation directory (its median step
    time, and the allocator's peak from the run's profile when it has one)."""
    path = Path(path)
    measured = path if path.is_file() else path / "measured.json"
    if measured.is_file():
        return json.loads(measured.read_text())["schedules"]
    directory, runs = path, {}
    for metrics_path in sorted(directory.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        profile_path = metrics_path.with_name("profile.json")
        activation = None
        if profile_path.is_file():
            peaks = [r.get("activation_peak_bytes") for r in load_profile(profile_path)["ranks"]]
            activation = max(peaks) if all(p is not None for p in peaks) else None
        runs[metrics_path.parent.name] = {
            "schedule": metrics["schedule"],
            "micro_batches": metrics["micro_batches"],
            "step_s": metrics["step_s_median"],
            "activation_bytes": activation,
            "parameter_bytes": max(metrics["memory"]["parameter_bytes_per_rank"]),
        }
    return runs


# ----- the command --------------------------------------------------------------------------------------------


def _mib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 2**20:.2f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def prediction_table(predictions: List[Prediction], budget: Optional[int], best: Optional[Prediction]) -> str:
    rows = []
    for p in sorted(predictions, key=lambda p: (p.micro_batches, p.per_micro_batch_s)):
        fits = "-" if budget is None else ("yes" if (p.memory_bytes() or p.parameter_bytes) <= budget else "no")
        rows.append([
            p.schedule,
            str(p.micro_batches), f"{1e3 * p.step_s:.1f}", f"{1e3 * p.per_micro_batch_s:.2f}",
            f"{100 * p.bubble:.0f}%",
            _mib(p.activation_bytes),
            _mib(p.parameter_bytes), fits, "<- recommended" if p is best else ""
        ])
    return _table(
        ["schedule", "M", "step ms", "ms/micro-batch", "bubble", "peak act MiB/rank", "params MiB/rank", "fits", ""],
        rows)


def comparison_table(m: ModelCosts, runs: Dict[str, dict]) -> str:
    rows = []
    for name, run in runs.items():
        try:
            p = predict(m, run["schedule"], m.stages, run["micro_batches"])
        except ValueError:
            continue
        err = p.step_s / run["step_s"] - 1
        quartiles = run.get("step_s_quartiles")
        measured = f"{1e3 * run['step_s']:.0f}" + ("" if not quartiles else
                                                   f" ({1e3 * quartiles[0]:.0f}..{1e3 * quartiles[1]:.0f})")
        act = run["activation_bytes"]
        act_err = "" if act is None or p.activation_bytes is None else f"{100 * (p.activation_bytes / act - 1):+.0f}%"
        rows.append([
            name, run["schedule"],
            str(run["micro_batches"]), f"{1e3 * p.step_s:.0f}", measured, f"{100 * err:+.0f}%",
            _mib(p.activation_bytes),
            _mib(act), act_err,
            _mib(p.parameter_bytes),
            _mib(run["parameter_bytes"])
        ])
    return _table([
        "run", "schedule", "M", "predicted ms", "measured ms (quartiles)", "error", "pred act MiB", "meas act MiB",
        "error", "pred params MiB", "meas params MiB"
    ], rows)


def add_parser(sub) -> None:
    p = sub.add_parser("advise", help="predict every schedule from a profiled step and recommend one")
    p.add_argument("profile",
                   nargs="+",
                   help="the file dualpipe.profile_step wrote (docs/advise.md); more profiles of the same model under "
                   "other schedules fill in what the first cannot show (a full backward's cost from a schedule "
                   "that runs them, a split one's from a schedule that splits)")
    p.add_argument("--memory-budget", help="bytes per rank for activations and parameters, e.g. 24GiB or 512MiB")
    p.add_argument("--micro-batches",
                   help="comma-separated M to consider (default: P, 2P, 3P, 4P, 6P, 8P and the "
                   "profiled M)")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--measured",
                   help="measured runs beside the predictions: the measured.json of 'measure' (or its directory), "
                   "or an ablation directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def parse_budget(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    from deepspeed_dualpipe.tools.bench.run import _BYTES
    units = dict(_BYTES, g=10**9, gb=10**9, gib=1 << 30)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in units:
        raise ValueError(f"--memory-budget {text!r}: expected bytes such as 1073741824, 512MiB or 24GiB")
    return int(float(match[1]) * units[match[2].lower()])


def main(args) -> None:
    profiles = [model_costs(load_profile(path)) for path in args.profile]
    m = combine(profiles[0], profiles[1:])
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    for name in names:
        get_spec(name)
    if args.micro_batches:
        try:
            micro_batches = [int(x) for x in args.micro_batches.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--micro-batches {args.micro_batches!r}: expected integers such as 8,16") from None
    else:
        micro_batches = micro_batch_range(m.stages, m.micro_batches)
    budget = parse_budget(args.memory_budget)
    predictions = predict_all(m, names, micro_batches)
    best = recommend(predictions, budget)
    runs = measured_runs(args.measured) if args.measured else {}
    if args.json:
        print(
            json.dumps(
                {
                    "model": asdict(m),
                    "predictions": [dict(asdict(p), costs=asdict(p.costs)) for p in predictions],
                    "recommended": None if best is None else {
                        "schedule": best.schedule,
                        "micro_batches": best.micro_batches
                    },
                    "measured": runs,
                },
                indent=1))
        return
    cores = f", the ranks got {m.effective_cores:.2f} cores" if m.effective_cores else ""
    print(
        f"profile: {m.schedule}, P={m.stages}, M={m.micro_batches}, data parallel {m.data_parallel}; one "
        f"micro-batch through the model ({m.clock} time): forward {1e3 * m.forward_s:.1f} ms, backward "
        f"{1e3 * m.backward_s:.1f} ms split (weight part {1e3 * m.weight_s:.1f} ms"
        f"{'' if m.weight_measured else ', assumed B/2'}), {1e3 * m.full_backward_s:.1f} ms whole"
        f"{'' if m.full_measured else ' (assumed I + W: no stage ran both; add a profile that does)'}, all-to-all {1e3 * (m.a2a_forward_s + m.a2a_backward_s):.1f}"
        f" ms, activations {_mib(m.activation_bytes)} MiB; parameters {_mib(m.parameter_bytes)} MiB; profiled step "
        f"{1e3 * m.measured_step_s:.0f} ms{cores}")
    print(prediction_table(predictions, budget, best))
    if best is None:
        print(f"no schedule and M fit --memory-budget {args.memory_budget}", file=sys.stderr)
        raise SystemExit(1)
    print(f"recommended: pipeline.schedule={best.schedule!r} with gradient_accumulation_steps={best.micro_batches} "
          f"({1e3 * best.per_micro_batch_s:.2f} ms per micro-batch"
          f"{'' if budget is None else f', {_mib(best.memory_bytes())} MiB per rank'})")
    if runs:
        print("\npredicted beside measured (step time: median train_batch; memory: the allocator's peak in each run's "
              "profiled step)")
        print(comparison_table(m, runs))
        print(pick_against_measured(m, runs, budget))


def pick_against_measured(m: ModelCosts, runs: Dict[str, dict], budget: Optional[int]) -> str:
    """Whether advise's pick among the measured schedules, at their M, is the measured fastest or within its
    noise (the fastest run's quartiles of step time)."""
    M = {run["micro_batches"] for run in runs.values()}
    if len(M) != 1:
        return "(the measured runs differ in M: no single pick to compare)"
    M = M.pop()
    pick = recommend(predict_all(m, sorted({r["schedule"] for r in runs.values()}), [M]), budget)
    if pick is None:
        return "(no measured schedule fits the budget)"
    measured = {r["schedule"]: r for r in runs.values()}
    fastest = min(measured.values(), key=lambda r: r["step_s"])
    chosen = measured[pick.schedule]
    high = (fastest.get("step_s_quartiles") or [fastest["step_s"]] * 2)[1]
    verdict = ("the measured fastest" if chosen is fastest else "within the noise of the measured fastest"
               if chosen["step_s"] <= high else "NOT within noise of the fastest")
    return (f"advise's pick at M={M}: {pick.schedule} (measured {1e3 * chosen['step_s']:.0f} ms); measured fastest: "
            f"{fastest['schedule']} ({1e3 * fastest['step_s']:.0f} ms, upper quartile {1e3 * high:.0f} ms): {verdict}")


__all__ = [
    "ModelCosts", "Prediction", "combine", "load_profile", "model_costs", "predict", "predict_all", "recommend", "main"
]
