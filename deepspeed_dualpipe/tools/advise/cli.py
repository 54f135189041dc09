"""``python -m deepspeed_dualpipe advise PROFILE [PROFILE ...]``: the tables, the recommendation, and measured
runs beside the predictions."""

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

from deepspeed_dualpipe.schedule import SCHEDULES, get_spec
from deepspeed_dualpipe.tools.advise.costs import ModelCosts, combine, load_profile, model_costs
from deepspeed_dualpipe.tools.advise.predict import Prediction, micro_batch_range, predict, predict_all, recommend
from deepspeed_dualpipe.tools.units import parse_bytes


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
    from deepspeed_dualpipe.tools.args import existing_file, existing_path, name_list
    p = sub.add_parser("advise", help="predict every schedule from a profiled step and recommend one")
    p.add_argument("profile",
                   nargs="*",
                   type=existing_file,
                   help="the file dualpipe.profile_step wrote (docs/advise.md); more profiles of the same model under "
                   "other schedules fill in what the first cannot show (a full backward's cost from a schedule "
                   "that runs them, a split one's from a schedule that splits)")
    p.add_argument("--memory-budget", help="bytes per rank for activations and parameters, e.g. 24GiB or 512MiB")
    p.add_argument("--micro-batches",
                   help="comma-separated M to consider (default: P, 2P, 3P, 4P, 6P, 8P and the "
                   "profiled M)")
    p.add_argument("--schedules", type=name_list, default=",".join(SCHEDULES))
    p.add_argument("--measured",
                   type=existing_path,
                   help="measured runs beside the predictions: the measured.json of 'measure' (or its directory), "
                   "or an ablation directory")
    p.add_argument("--what-if",
                   metavar="FILE",
                   type=existing_file,
                   help="instead of profiles: a JSON description of a cluster and model (P up to 64, M up to 1024, "
                   "layers, per-layer F/B/W, all-to-all bytes, link bandwidth, EP size; docs/advise.md), predicted "
                   "for every schedule on paper (tools/advise/whatif.py)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def parse_budget(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        return parse_bytes(text)
    except ValueError:
        raise ValueError(f"--memory-budget {text!r}: expected bytes such as 1073741824, 512MiB or 24GiB") from None


def what_if(args) -> None:
    from deepspeed_dualpipe.tools.advise import whatif
    w = whatif.load_what_if(args.what_if)
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    for name in names:
        get_spec(name)
    rows = whatif.predict_what_if(w, names)
    print(json.dumps(whatif.as_json(w, rows), indent=1) if args.json else whatif.render(w, rows))


def _costs_of(path):
    """The model costs of one profile; a profile without the entries and numbers they need names itself."""
    profile = load_profile(path)
    for key in ("stages", "micro_batches"):
        value = profile.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {key!r} is {value!r}, not a positive integer; profile the step again")
    if not isinstance(profile.get("schedule"), str):
        raise ValueError(f"{path}: 'schedule' is {profile.get('schedule')!r}, not a schedule name")
    if not isinstance(profile.get("ranks"), list) or not profile["ranks"] or not all(
            isinstance(r, dict) for r in profile["ranks"]):
        raise ValueError(f"{path}: 'ranks' is not a non-empty list of rank entries; profile the step again")
    try:
        return model_costs(profile)
    except (KeyError, TypeError, IndexError, AttributeError, ZeroDivisionError) as error:
        raise ValueError(f"{path} is not a complete profile ({type(error).__name__}: {error} where a "
                         f"dualpipe.profile_step profile has a number); profile the step again") from None


def main(args) -> None:
    if getattr(args, "what_if", None):
        if args.profile:
            raise ValueError("advise: give profiles or --what-if FILE, not both")
        return what_if(args)
    if not args.profile:
        raise ValueError("advise: give a profile (the file dualpipe.profile_step wrote) or --what-if FILE")
    profiles = [_costs_of(path) for path in args.profile]
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
