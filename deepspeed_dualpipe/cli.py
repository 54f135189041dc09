"""``python -m deepspeed_dualpipe``: print, verify, simulate and draw schedules."""

import argparse
import json
import sys

from deepspeed_dualpipe.tools import args as a
from deepspeed_dualpipe.analysis.symbolic import Costs, ScheduleError
from deepspeed_dualpipe.schedule import SCHEDULES, get_spec

DEFAULT_COSTS = "F=1,B=2,W=1"


def _names(text: str):
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_spec(name)  # raises ValueError naming the valid schedules
    return names


def _add_shape(p, schedule=True):
    if schedule:
        p.add_argument("--schedule", required=True, help=f"one of: {', '.join(SCHEDULES)}")
    p.add_argument("--stages", "-P", type=a.stages, required=True, help=f"pipeline ranks P (at most {a.MAX_STAGES})")
    p.add_argument("--micro-batches",
                   "-M",
                   type=a.micro_batches,
                   required=True,
                   help=f"micro-batches per batch M (at most {a.MAX_MICRO_BATCHES}; P x M at most "
                   f"{a.MAX_STAGE_MICRO_BATCHES})")


def _add_costs(p, default=DEFAULT_COSTS):
    p.add_argument("--cost",
                   default=default,
                   help=f"per-chunk costs F,B (full backward),W (its weight part),FB (overlapped pair),latency "
                   f"(default {default})")


def cmd_schedule(args) -> None:
    from deepspeed_dualpipe.analysis.render import render_text, schedule_json
    get_spec(args.schedule).validate(args.stages, args.micro_batches)
    if args.format == "json":
        print(json.dumps(schedule_json(args.schedule, args.stages, args.micro_batches), indent=1))
    elif args.format == "torch-csv":
        from deepspeed_dualpipe.analysis.torch_format import to_torch_csv
        sys.stdout.write(to_torch_csv(args.schedule, args.stages, args.micro_batches))
    else:
        print(render_text(args.schedule, args.stages, args.micro_batches, Costs.parse(args.cost)))


def cmd_simulate(args) -> None:
    from deepspeed_dualpipe.analysis.simulate import simulate, table
    costs = Costs.parse(args.cost)
    names = _names(args.schedules)
    results = []
    for name in names:
        try:
            get_spec(name).validate(args.stages, args.micro_batches)
        except ValueError as error:
            if len(names) == 1:
                raise
            print(f"skipping {name}: {error}", file=sys.stderr)
            continue
        results.append(simulate(name, args.stages, args.micro_batches, costs))
    if args.json:
        print(json.dumps({"schedules": {s.schedule: s.to_json() for s in results}}, indent=1))
        return
    print(f"P={args.stages} ranks, M={args.micro_batches} micro-batches, per-chunk costs F={costs.F:g} "
          f"B={costs.B:g} W={costs.W:g} F&B={costs.pair:g} latency={costs.latency:g}")
    print(table(results))


def cmd_verify(args) -> None:
    from deepspeed_dualpipe.analysis.verify import verify, verify_table
    if args.table:
        print(verify_table(_names(args.schedules), args.table_stages, unbatched=args.unbatched))
        return
    if args.stages is None or args.micro_batches is None:
        raise ValueError("verify needs --stages and --micro-batches (or --table)")
    for name in _names(args.schedules):
        result = verify(name, args.stages, args.micro_batches)
        print(f"{name}: ok under NCCL's rules, P={args.stages} M={args.micro_batches} (first batch and steady state), "
              f"groups posted {result.groups[0]}/{result.groups[1]}, peak live activations per rank "
              f"{result.peak_activations}")


def cmd_plot(args) -> None:
    from deepspeed_dualpipe.analysis.plot import plot_timeline
    get_spec(args.schedule).validate(args.stages, args.micro_batches)
    print(plot_timeline(args.schedule, args.stages, args.micro_batches, Costs.parse(args.cost), args.out))


def cmd_demo(args) -> None:
    """The main job: the MoE language model of configs/dualpipe_moe.json, trained on ``--ranks`` local
    ranks through DeepSpeed's launcher (on CPU without a GPU)."""
    import time
    from pathlib import Path
    from deepspeed_dualpipe.tools.lm.launch import launch
    if not Path(args.config).is_file():
        raise ValueError(f"--config {args.config}: no such file (the demo's configs are in a source checkout's "
                         f"configs/ directory; pass the path of one, or of your own)")
    extra = ["--steps", str(args.steps)] if args.steps else []
    print(f"launching: deepspeed --num_gpus {args.ranks} examples/train_moe_lm.py --deepspeed_config {args.config} "
          f"{' '.join(extra)}".rstrip(),
          flush=True)
    start = time.perf_counter()
    done = launch(args.config, args.ranks, extra)
    if done.returncode:
        raise SystemExit(f"error: the training job failed (exit status {done.returncode})")
    print(f"demo finished in {time.perf_counter() - start:.0f} s", flush=True)


def cmd_ablate(args) -> None:
    """Every variant of an ablation file, one launch each, then a table and a plot (deepspeed_dualpipe.tools.lm.ablate)."""
    from deepspeed_dualpipe.tools.lm.ablate import main
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    if main(args.config, only, args.report_only):
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = a.OneLineParser(prog="python -m deepspeed_dualpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schedule", help="print one schedule: a picture, its JSON, or torch's CSV")
    _add_shape(p)
    p.add_argument("--format", choices=["text", "json", "torch-csv"], default="text")
    _add_costs(p)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("simulate", help="simulated makespan, bubble and memory beside the report's Table 2")
    _add_shape(p, schedule=False)
    _add_costs(p)
    p.add_argument("--schedules", type=a.name_list, default=",".join(SCHEDULES))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("verify",
                       help="prove every rank's instruction stream deadlock-free under NCCL's point-to-point rules")
    p.add_argument("--stages", "-P", type=a.stages, help="pipeline ranks P")
    p.add_argument("--micro-batches", "-M", type=a.micro_batches, help="micro-batches per batch M")
    p.add_argument("--schedules", type=a.name_list, default=",".join(SCHEDULES))
    p.add_argument("--table", action="store_true", help="a table over P (--table-stages) and M in {2P, 2P+2, 4P}")
    p.add_argument("--table-stages", type=a.stage_list, default="2,4,8,16", help="the P of --table (default 2,4,8,16)")
    p.add_argument("--unbatched",
                   action="store_true",
                   help="with --table: also each send and receive posted on its own (the engine before commits)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("plot", help="draw a schedule's timeline (PNG or SVG)")
    _add_shape(p)
    _add_costs(p)
    p.add_argument("--out", type=a.writable_file, required=True, help="FILE.png or FILE.svg")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="the main job: train the MoE language model of a config on local ranks")
    p.add_argument("--config", default="configs/dualpipe_moe.json", help="DeepSpeed config with an \"lm\" section")
    p.add_argument("--ranks", type=a.positive_int, default=4, help="local ranks to launch (default 4)")
    p.add_argument("--steps", type=a.positive_int, help="override lm.steps")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ablate", help="train the demo model under each config of an ablation file; table and plot")
    p.add_argument("config",
                   type=a.existing_file,
                   help="ablation file, e.g. configs/ablation.json (configs plus shared settings)")
    p.add_argument("--only", help="comma-separated variant names (lm.name) to run; the report covers all")
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the runs' metrics")
    p.set_defaults(func=cmd_ablate)

    from deepspeed_dualpipe.tools.advise import add_parser as add_advise  # advise: every schedule from a profile
    add_advise(sub)
    from deepspeed_dualpipe.tools.lm.measure import add_parser as add_measure  # the demo under every schedule
    add_measure(sub)
    from deepspeed_dualpipe.tools.bench.run import add_parser as add_bench  # bench: real engine, timed
    add_bench(sub)
    from deepspeed_dualpipe.tools.bench.overlap import add_parser as add_overlap  # one MoE pair, overlapped or not
    add_overlap(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("schedule", "simulate", "verify", "plot"):
        a.check_size(parser, args.stages, args.micro_batches)
    if args.command == "plot" and not args.out.lower().endswith((".png", ".svg")):
        parser.error(f"argument --out: {args.out}: expected a file name ending in .png or .svg")
    try:
        args.func(args)
    except (ValueError, ScheduleError, OSError) as error:  # bad input found while working: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0
