"""``python -m deepspeed_dualpipe advise PROFILE``: every schedule predicted from one profiled step.

The profile (``dualpipe.profile_step``, format in docs/advise.md) holds what each computation of one
step took on every rank. From it this module derives what one micro-batch costs through the whole
model (:class:`ModelCosts`: forward, backward and its weight part, all-to-all time, activation and
parameter bytes), cuts that into the chunks of each schedule in the registry, runs the simulator
with those costs, and adds what the simulator does not model (posting sends and receives, loading
micro-batches, gradient reductions and the optimizer step, and the engine's work around the
schedule), each as measured in the profile. Overlapped pairs of MoE chunks (dualpipe, dualpipev) are
costed by replaying the engine's interleaving of the two micro-batches' steps
(:func:`~deepspeed_dualpipe.tools.bench.predict.overlapped_pair`).

It assumes the model's stages cost alike (the simulator takes one cost per kind of computation), and
that per-chunk costs scale with the share of the model a chunk holds.
"""

import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepspeed_dualpipe.analysis.events import Comm, schedule_events
from deepspeed_dualpipe.analysis.simulate import simulate
from deepspeed_dualpipe.analysis.symbolic import Costs
from deepspeed_dualpipe.schedule import SCHEDULES, get_spec

FORMAT = "deepspeed-dualpipe-profile/1"
OVERLAPPING = ("dualpipe", "dualpipev")  # their pairs interleave MoE all-to-alls (overlap_moe_a2a: true)
_REDUCTIONS = ("ReduceGrads", "ReduceTiedGrads")


def _mean(values: Sequence[float]) -> Optional[float]:
    values = list(values)
    return statistics.fmean(values) if values else None


@dataclass
class ModelCosts:
    """One micro-batch through the whole model, and the fixed costs of a step, from a profile (seconds,
    bytes). ``forward_s`` and ``backward_s`` include the all-to-all time of computations run alone."""

    schedule: str
    stages: int
    micro_batches: int
    data_parallel: int
    forward_s: float
    backward_s: float
    weight_s: float
    weight_measured: bool  # False: the profiled schedule never split a backward; W = B/2 is assumed
    a2a_forward_s: float
    a2a_backward_s: float
    a2a_per_call_s: float
    moe_layers: float  # MoE layers of the whole model (two all-to-alls per forward each)
    p2p_post_s: float  # one send or receive posted
    load_s: float  # one LoadMicroBatch
    reduce_s: float  # gradient reductions over data parallelism (and tied layers), per step
    optimizer_s_per_byte: float
    outside_s: float  # train_batch around the instructions: the loss all-reduce, the iterator, ...
    activation_bytes: Optional[float]  # one micro-batch's activations through the whole model
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


def model_costs(profile: dict) -> ModelCosts:
    """What :class:`ModelCosts` a profile implies (see the module docstring)."""
    schedule, P, M = profile["schedule"], profile["stages"], profile["micro_batches"]
    layout = get_spec(schedule).layout(P, M)
    K = layout.model_stages
    ranks = profile["ranks"]

    def samples(table: str, kind: str) -> List[float]:
        return [v for r in ranks for key, values in r[table].items() if key.split(":")[0] == kind for v in values]

    F = _mean(samples("compute_s", "F"))
    full, inputs, weights = samples("compute_s", "B"), samples("compute_s", "I"), samples("compute_s", "W")
    if F is None or not (full or inputs):
        raise ValueError("the profile has no forward or no backward run alone: profile a schedule such as zbv, "
                         "zb1p or interleaved-1f1b")
    W = _mean(weights)
    split = [i + W for i in inputs] if W is not None else []
    B = _mean(full + split)
    weight_measured = W is not None
    if W is None:
        W = B / 2
    a2a_f, a2a_b = _mean(samples("a2a_s", "F")) or 0.0, _mean(samples("a2a_s", "B")) or 0.0
    calls_f = _mean(samples("a2a_count", "F")) or 0.0
    calls = sum(samples("a2a_count", "F")) + sum(samples("a2a_count", "B"))
    per_call = (sum(samples("a2a_s", "F")) + sum(samples("a2a_s", "B"))) / calls if calls else 0.0
    p2p = [v for r in ranks for v in r["p2p_s"]]
    loads = sum(r["other_s"].get("LoadMicroBatch", 0.0) for r in ranks)
    load_count = sum(_count_loads(schedule, P, M, r["pipeline_rank"]) for r in ranks)
    reduce_s = max(sum(r["other_s"].get(n, 0.0) for n in _REDUCTIONS) for r in ranks)
    optimizer = max(r["other_s"].get("OptimizerStep", 0.0) / max(r["parameter_bytes"], 1) for r in ranks)
    dp0 = [r for r in ranks if r["data_parallel_rank"] == 0]
    parameters = sum(r["parameter_bytes"] for r in dp0) / layout.param_copies
    activation = None
    peaks = [(r["activation_peak_bytes"], r["pipeline_rank"]) for r in ranks if r.get("activation_peak_bytes")]
    if peaks:
        live = simulate(schedule, P, M).peak_activations
        activation = _mean(bytes_ / live[rank] for bytes_, rank in peaks) * K
    return ModelCosts(schedule=schedule,
                      stages=P,
                      micro_batches=M,
                      data_parallel=profile.get("data_parallel", 1),
                      forward_s=F * K,
                      backward_s=B * K,
                      weight_s=W * K,
                      weight_measured=weight_measured,
                      a2a_forward_s=a2a_f * K,
                      a2a_backward_s=a2a_b * K,
                      a2a_per_call_s=per_call,
                      moe_layers=calls_f * K / 2,
                      p2p_post_s=_mean(p2p) or 0.0,
                      load_s=loads / load_count if load_count else 0.0,
                      reduce_s=reduce_s,
                      optimizer_s_per_byte=optimizer,
                      outside_s=_mean(r["wall_s"] - r["step_s"] for r in ranks) or 0.0,
                      activation_bytes=activation,
                      parameter_bytes=parameters,
                      measured_step_s=max(r["wall_s"] for r in ranks))


def _count_loads(schedule: str, P: int, M: int, rank: int) -> int:
    from deepspeed.runtime.pipe import schedule as ds
    from deepspeed_dualpipe.schedule import rank_steps
    return sum(isinstance(i, ds.LoadMicroBatch) for step in rank_steps(schedule, P, M)[rank] for i in step)


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


def chunk_costs(m: ModelCosts, schedule: str, P: int) -> Costs:
    """The simulator's per-chunk costs of ``schedule`` on ``P`` ranks (seconds)."""
    K = get_spec(schedule).layout(P, 2 * P).model_stages
    F, B, W = m.forward_s / K, m.backward_s / K, m.weight_s / K
    if schedule in ("1f1b", "ds-dualpipev"):
        W = 0.0 if schedule == "1f1b" else W  # DeepSpeed's engines never split; the stream says B
    pair = None
    if schedule in OVERLAPPING and m.moe_layers and m.a2a_per_call_s:
        from deepspeed_dualpipe.tools.bench.predict import overlapped_pair
        layers = max(1, round(m.moe_layers / K))
        compute_f = max(F - m.a2a_forward_s / K, 0.0) / layers
        compute_b = max(B - m.a2a_backward_s / K, 0.0) / layers
        pair = overlapped_pair(layers, compute_f, compute_b, m.a2a_per_call_s)
    return Costs(F=F, B=B, W=min(W, B), FB=pair)


def predict(m: ModelCosts, schedule: str, P: int, M: int) -> Prediction:
    spec = get_spec(schedule)
    spec.validate(P, M)
    layout = spec.layout(P, M)
    costs = chunk_costs(m, schedule, P)
    sim = simulate(schedule, P, M, costs)
    _, streams = schedule_events(schedule, P, M)
    # Work the simulator does not see, on each rank's own thread: posting sends and receives, loading.
    extra = max(
        sum(isinstance(e, Comm) for e in events) * m.p2p_post_s + _count_loads(schedule, P, M, r) * m.load_s
        for r, events in enumerate(streams))
    per_rank_params = m.parameter_bytes * layout.param_copies / P
    mirror = m.reduce_s if layout.param_copies > 1 else 0.0  # the mirror's all-reduce, as large as DP's
    tail = m.reduce_s + mirror + m.optimizer_s_per_byte * per_rank_params + m.outside_s
    activation = None
    if m.activation_bytes is not None:
        activation = int(max(sim.peak_activations) * m.activation_bytes / layout.model_stages)
    bubble = statistics.fmean(sim.bubble) / sim.makespan if sim.makespan else 0.0
    return Prediction(schedule, M, sim.makespan + extra + tail, bubble, activation, int(per_rank_params), costs)


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
    return min(fits, key=lambda p: (p.per_micro_batch_s, p.step_s), default=None)


# ----- measured runs beside the predictions (docs/advise.md) ------------------------------------------------------


def measured_runs(directory) -> Dict[str, dict]:
    """Each run of an ablation directory: its schedule, M, median step time and memory per rank."""
    runs = {}
    for metrics_path in sorted(Path(directory).glob("*/metrics.json")):
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
        act = run["activation_bytes"]
        act_err = "" if act is None or p.activation_bytes is None else f"{100 * (p.activation_bytes / act - 1):+.0f}%"
        rows.append([
            name, run["schedule"],
            str(run["micro_batches"]), f"{1e3 * p.step_s:.0f}", f"{1e3 * run['step_s']:.0f}", f"{100 * err:+.0f}%",
            _mib(p.activation_bytes),
            _mib(act), act_err,
            _mib(p.parameter_bytes),
            _mib(run["parameter_bytes"])
        ])
    return _table([
        "run", "schedule", "M", "predicted ms", "measured ms", "error", "pred act MiB", "meas act MiB", "error",
        "pred params MiB", "meas params MiB"
    ], rows)


def add_parser(sub) -> None:
    p = sub.add_parser("advise", help="predict every schedule from a profiled step and recommend one")
    p.add_argument("profile", help="the file dualpipe.profile_step wrote (docs/advise.md)")
    p.add_argument("--memory-budget", help="bytes per rank for activations and parameters, e.g. 24GiB or 512MiB")
    p.add_argument("--micro-batches",
                   help="comma-separated M to consider (default: P, 2P, 3P, 4P, 6P, 8P and the "
                   "profiled M)")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--measured",
                   help="an ablation directory (runs/advise): its runs' measured step time and memory "
                   "beside the predictions")
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
    m = model_costs(load_profile(args.profile))
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
    print(f"profile: {m.schedule}, P={m.stages}, M={m.micro_batches}, data parallel {m.data_parallel}; one "
          f"micro-batch through the model: forward {1e3 * m.forward_s:.1f} ms, backward {1e3 * m.backward_s:.1f} ms "
          f"(weight part {1e3 * m.weight_s:.1f} ms{'' if m.weight_measured else ', assumed B/2'}), all-to-all "
          f"{1e3 * (m.a2a_forward_s + m.a2a_backward_s):.1f} ms, activations {_mib(m.activation_bytes)} MiB; "
          f"parameters {_mib(m.parameter_bytes)} MiB; profiled step {1e3 * m.measured_step_s:.0f} ms")
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


__all__ = ["ModelCosts", "Prediction", "load_profile", "model_costs", "predict", "predict_all", "recommend", "main"]
