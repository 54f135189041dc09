"""``python -m deepspeed_dualpipe bench``: every schedule through the real engine, beside the simulator."""

import json
import re
import statistics
from typing import Dict

from deepspeed_dualpipe.bench import predict
from deepspeed_dualpipe.schedules import get_spec

DEFAULT_SCHEDULES = "1f1b,zb1p,ds-dualpipev,dualpipev,dualpipe"
_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_costs(text: str) -> Dict[str, float]:
    """``"F=5ms,B=10ms,W=5ms"`` -> seconds per layer (units s, ms, us; none means seconds)."""
    costs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(F|B|W)\s*=\s*([0-9.]+(?:e-?[0-9]+)?)\s*(s|ms|us)?", item, re.IGNORECASE)
        if not match:
            raise ValueError(f"bad cost {item!r}: expected F=, B= or W= a time such as 5ms")
        costs[match[1].upper()] = float(match[2]) * _UNITS[(match[3] or "").lower()]
    missing = {"F", "B", "W"} - set(costs)
    if missing:
        raise ValueError(f"--cost needs F, B and W; missing {', '.join(sorted(missing))}")
    if costs["W"] > costs["B"]:
        raise ValueError("--cost: W (the weight part of the backward) must not exceed B")
    return costs


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time every schedule through the real engine with cost-model layers")
    p.add_argument("--schedules", default=DEFAULT_SCHEDULES)
    p.add_argument("--stages", "-P", type=int, default=4, help="pipeline ranks P")
    p.add_argument("--micro-batches", "-M", type=int, default=16)
    p.add_argument("--layers", type=int, default=8, help="layers of the whole model (a multiple of 2P)")
    p.add_argument("--cost", default="F=5ms,B=10ms,W=5ms", help="per-layer times F, B (full backward), W (its "
                   "weight part)")
    p.add_argument("--width", type=int, default=4096, help="floats per activation (sent between stages)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are given up on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def bench(args) -> dict:
    # Imported here: the CLI builds its parser without loading torch's process machinery.
    from deepspeed_dualpipe.bench import measure
    from deepspeed_dualpipe.launch import run_ranks
    from deepspeed_dualpipe.bench.rank import BenchSpec, bench_rank
    from deepspeed_dualpipe.module import PLUGIN_SCHEDULES
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    costs = parse_costs(args.cost)
    for name in names:  # fail here, not in P processes
        get_spec(name).validate(args.stages, args.micro_batches)
        predict.layers_per_chunk(name, args.stages, args.layers)
    spec = BenchSpec(tuple(names), args.stages, args.micro_batches, args.layers, costs["F"], costs["B"], costs["W"],
                     args.width, args.repeats)
    per_rank = run_ranks(bench_rank, args.stages, spec, timeout=args.timeout)
    results = {}
    for name in names:
        row = measure.summarize(per_rank, name, plugin=name in PLUGIN_SCHEDULES)
        row.update(predict.predicted(name, args.stages, args.micro_batches, args.layers, **costs))
        results[name] = row
    base = results.get("1f1b")
    for row in results.values():
        row["ratio_to_1f1b"] = row["step_s"] / base["step_s"] if base else None
        row["sim_ratio_to_1f1b"] = row["sim_step_s"] / base["sim_step_s"] if base else None
    plugin = [results[n]["overhead_ms"] for n in names if n in PLUGIN_SCHEDULES]
    return {"stages": args.stages, "micro_batches": args.micro_batches, "layers": args.layers, "costs_s": costs,
            "repeats": args.repeats, "schedules": results,
            "plugin_overhead_ms": statistics.median(plugin) if plugin else None,
            "scaling": predict.scaling(names, layers_per_stage=args.layers // args.stages,
                                       micro_batches_per_rank=max(2, args.micro_batches // args.stages), **costs)}


def _ms(x):
    return "-" if x is None else f"{1e3 * x:.1f}"


def _fraction(x):
    return "-" if x is None else f"{x:.3f}"


def _ratio(x):
    return "-" if x is None else f"{x:.3f}"


def _bubbles(values):
    return " ".join(f"{v:.2f}" for v in values)


def _grid(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(result: dict) -> str:
    c = result["costs_s"]
    out = [f"P={result['stages']} ranks, M={result['micro_batches']} micro-batches, {result['layers']} layers, per "
           f"layer F={_ms(c['F'])}ms B={_ms(c['B'])}ms W={_ms(c['W'])}ms, median of {result['repeats']} steps",
           ""]
    rows = [[name, _ms(r["step_s"]), _ms(r["sim_step_s"]), _ratio(r["ratio_to_1f1b"]), _ratio(r["sim_ratio_to_1f1b"]),
             _bubbles(r["bubble"]), _bubbles(r["sim_bubble"]),
             "-" if r["overhead_ms"] is None else f"{r['overhead_ms']:.2f}"]
            for name, r in result["schedules"].items()]
    out.append(_grid(["schedule", "step ms", "sim ms", "x 1f1b", "sim x 1f1b", "bubble/rank", "sim bubble/rank",
                      "overhead ms/instr"], rows))
    out += ["", "where the time goes, per rank (ms): busy = compute instructions less waits; in layers = sleeping"]
    rows = [[name, " ".join(_ms(b) for b in r["busy_s"]), " ".join(_ms(b) for b in r["layer_s"]),
             " ".join(_ms(r["sim_step_s"] * (1 - b)) for b in r["sim_bubble"])]
            for name, r in result["schedules"].items()]
    out.append(_grid(["schedule", "busy", "in layers", "sim busy"], rows))
    if result["plugin_overhead_ms"] is not None:
        out.append(f"plugin overhead: {result['plugin_overhead_ms']:.2f} ms per instruction (median; engine time not "
                   f"in layers or waiting). For DeepSpeed's engines only compute instructions are counted.")
    out += ["", "simulated worst-rank bubble fraction as P grows (M = "
            f"{max(2, result['micro_batches'] // result['stages'])}P, {result['layers'] // result['stages']} layers "
            "per 1f1b stage):"]
    names = list(result["schedules"])
    out.append(_grid(["P"] + names, [[P] + [_fraction(row[n]) for n in names]
                                     for P, row in result["scaling"].items()]))
    return "\n".join(out)


def main(args) -> None:
    result = bench(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result))
