"""``python -m deepspeed_dualpipe measure``: the demo model under every schedule in one launch, for ``advise``.

Every rank builds one engine per schedule from the same config and trains them in turn, one step each per
round (the bench's rule: on a shared machine, drift in load then hits every schedule alike). Per schedule it
measures the median step time (the slowest rank's ``train_batch`` in each round; warm-up, profiled and memory
rounds left out) and the allocator's activation peak per rank (read as a profile's memory step reads it,
:func:`~deepspeed_dualpipe.runtime.profile.step_meter`, in a round of its own), and for each of the plugin's schedules it writes the profile of one
step (docs/advise.md) to ``<out>/<schedule>/profile.json``. ``<out>/measured.json`` holds the figures that
``advise --measured`` puts beside its predictions.
"""

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

WARMUP = 2


@dataclass
class MeasureSpec:
    config: Dict  # the demo's DeepSpeed config, prepared (lm section included)
    schedules: List[str]
    rounds: int

    @property
    def profile_round(self) -> int:
        return WARMUP

    @property
    def memory_round(self) -> int:
        return WARMUP + 1

    @property
    def total_rounds(self) -> int:
        return WARMUP + 2 + self.rounds


def _config_for(config: Dict, schedule: str) -> Dict:
    from deepspeed_dualpipe.schedule import get_spec
    out = copy.deepcopy(config)
    out["pipeline"] = dict(out.get("pipeline") or {}, schedule=schedule)
    for monitor in ("tensorboard", "csv_monitor", "wandb", "comet"):
        out.pop(monitor, None)
    if not get_spec(schedule).runs_on_plugin_engine:
        out.pop("dualpipe", None)  # DeepSpeed's own engines do not read it
    else:
        out["dualpipe"] = {k: v for k, v in (out.get("dualpipe") or {}).items() if not k.startswith(("profile_"))}
    return out


def measure_rank(spec: MeasureSpec) -> dict:
    """In every rank: each schedule's step times, memory and (plugin schedules) profiled step."""
    import torch.distributed as dist
    from deepspeed_dualpipe.runtime.profile import read_meter, record_step, step_meter
    from deepspeed_dualpipe.tools.lm import data as D
    from deepspeed_dualpipe.tools.lm.train import LMConfig, build_engine, use_cores
    from deepspeed_dualpipe.schedule import get_spec
    use_cores()
    lm = LMConfig.from_dict(spec.config["lm"])
    engines = {name: build_engine(_config_for(spec.config, name), lm) for name in spec.schedules}
    first = next(iter(engines.values()))
    M = first.micro_batches
    dp_rank, dp_size = first.grid.get_data_parallel_id(), first.grid.get_data_parallel_world_size()
    train, val = D.split(D.corpus(), lm.block_size, lm.val_every)
    batches = D.Batches(train, val, lm.seq_len, first.train_micro_batch_size_per_gpu(), M, dp_rank, dp_size, lm.seed)
    out = {name: {"steps": [], "peak": None, "after": [], "profile": None} for name in engines}
    for round_ in range(spec.total_rounds):
        for name, engine in engines.items():
            run = (lambda e=engine, r=round_: e.train_batch(data_iter=batches.train_iter(r)))
            dist.barrier()
            if round_ == spec.profile_round and get_spec(name).runs_on_plugin_engine:
                _, out[name]["profile"] = record_step(engine, run)
            elif round_ == spec.memory_round:
                meter = step_meter(engine)  # what a profile's memory step reads, for like against like
                if meter is None:  # an allocator it cannot read: no memory figure (advise says n/a)
                    run()
                else:
                    meter.measure(run)
                    out[name]["after"], out[name]["peak"] = read_meter(meter)
            else:
                start = time.perf_counter()
                run()
                if round_ >= WARMUP + 2:
                    out[name]["steps"].append(time.perf_counter() - start)
    for name, engine in engines.items():
        out[name]["parameter_bytes"] = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    return {"global_rank": dist.get_rank(), "pipeline_rank": first.stage_id, "schedules": out}


def summarize(per_rank: List[dict], spec: MeasureSpec, out_dir: Path) -> dict:
    """measured.json: per schedule the median step (slowest rank per round), memory, and the profile path."""
    from deepspeed_dualpipe.runtime.monitor import write_profile
    result = {"rounds": spec.rounds, "schedules": {}}
    for name in spec.schedules:
        rows = [r["schedules"][name] for r in per_rank]
        steps = [max(r["steps"][i] for r in rows) for i in range(len(rows[0]["steps"]))]
        quartiles = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
        entry = {
            "schedule": name,
            "micro_batches": spec.config["gradient_accumulation_steps"],
            "step_s": statistics.median(steps),
            "step_s_quartiles": [quartiles[0], quartiles[2]],
            "steps_s": steps,
            "activation_bytes": max(r["peak"] for r in rows) if all(r["peak"] is not None for r in rows) else None,
            "activation_bytes_per_rank": [r["peak"] for r in rows],
            "parameter_bytes": max(r["parameter_bytes"] for r in rows),
            "profile": None,
        }
        timed = [r["profile"] for r in rows]
        if all(t is not None for t in timed):
            for t, row in zip(timed, rows):
                t.activation_peak_bytes, t.memory_after_bytes = row["peak"], row["after"]
            path = out_dir / name / "profile.json"
            write_profile(str(path), timed, timed, WARMUP)
            entry["profile"] = str(path)
        result["schedules"][name] = entry
    return result


def add_parser(sub) -> None:
    from deepspeed_dualpipe.tools.args import name_list, positive_float, positive_int, writable_dir
    from deepspeed_dualpipe.schedule import SCHEDULES
    p = sub.add_parser("measure",
                       help="the demo model under every schedule in one launch: step time, memory, "
                       "profiles (for advise)")
    p.add_argument("--config", default="configs/dualpipe_moe.json", help="DeepSpeed config with an \"lm\" section")
    p.add_argument("--ranks", type=positive_int, default=4)
    p.add_argument("--schedules", type=name_list, default=",".join(SCHEDULES))
    p.add_argument("--rounds", type=positive_int, default=10, help="timed steps per schedule, taken in turn")
    p.add_argument("--out",
                   type=writable_dir,
                   default="runs/measure",
                   help="directory for measured.json and the profiles")
    p.add_argument("--timeout", type=positive_float, default=1800.0)
    p.set_defaults(func=main)


def main(args) -> Optional[dict]:
    from deepspeed_dualpipe.schedule import get_spec
    from deepspeed_dualpipe.testing.launch import run_ranks
    from deepspeed_dualpipe.tools.lm.train import prepare_config
    if not Path(args.config).is_file():
        raise ValueError(f"--config {args.config}: no such file")
    if args.rounds < 2:
        raise ValueError(f"--rounds {args.rounds}: at least 2")
    config, lm = prepare_config(args.config)
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    P, M = lm.pipeline_stages, config["gradient_accumulation_steps"]
    for name in names:
        get_spec(name).validate(P, M)  # here, not in every rank
    spec = MeasureSpec(config, names, args.rounds)
    started = time.perf_counter()
    per_rank = run_ranks(measure_rank, args.ranks, spec, timeout=args.timeout)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = summarize(per_rank, spec, out_dir)
    result["ranks"], result["seconds"] = args.ranks, time.perf_counter() - started
    (out_dir / "measured.json").write_text(json.dumps(result, indent=1))
    for name, e in result["schedules"].items():
        print(f"{name:18s} step {1e3 * e['step_s']:7.1f} ms (quartiles {1e3 * e['step_s_quartiles'][0]:.1f}.."
              f"{1e3 * e['step_s_quartiles'][1]:.1f})  peak activations {e['activation_bytes'] or 0:>11} B  "
              f"profile {e['profile'] or '-'}")
    print(f"wrote {out_dir / 'measured.json'} in {result['seconds']:.0f} s")
    return result


__all__ = ["MeasureSpec", "measure_rank", "summarize", "main"]
