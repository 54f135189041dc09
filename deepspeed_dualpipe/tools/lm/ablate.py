"""``python -m deepspeed_dualpipe ablate configs/ablation.json``: the demo model under every schedule.

The ablation file lists DeepSpeed configs (one per variant) and settings they share::

    {"ranks": 4,                              # local ranks of every launch
     "out_dir": "runs/ablation",              # each variant writes <out_dir>/<its lm.name>/
     "configs": ["ablation/1f1b.json", ...],  # paths relative to the ablation file
     "shared": {"gradient_clipping": 0.0, "lm": {"steps": 40}}}   # merged over every config

Each variant is one launch of ``examples/train_moe_lm.py`` through the ``deepspeed`` launcher
(:func:`deepspeed_dualpipe.tools.lm.launch.launch`), with the same seed and data unless a config says
otherwise (differences other than the schedule's are printed). Before its launch, the variant's
complete config (``base`` files resolved, shared settings merged) is written to
``<out_dir>/<name>/config.json``: that file alone reproduces the run. Its output goes to
``log.txt`` beside it. Then ``<out_dir>/ablation.md`` (a table), ``ablation.png`` (a plot) and
``ablation.json`` (the table's numbers) are written from the runs' ``metrics.json``.
"""

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from deepspeed_dualpipe.schedule import PAIRED_SCHEDULES
from deepspeed_dualpipe.tools.lm import config_files

KEYS = {"ranks", "out_dir", "configs", "shared"}
# Config keys that name the variant rather than its training: they may differ between variants.
VARIANT_KEYS = {("pipeline", ), ("dualpipe", ), ("lm", "name"), ("lm", "out_dir")}


@dataclass
class Variant:
    name: str
    source: Path  # the config file it came from
    config: Dict  # complete: what the run records and what reproduces it

    @property
    def schedule(self) -> str:
        return (self.config.get("pipeline") or {}).get("schedule", "1f1b")

    @property
    def overlap(self) -> Optional[bool]:
        if self.schedule not in PAIRED_SCHEDULES:  # overlapped pairs: where the MoE overlap applies
            return None
        return bool((self.config.get("dualpipe") or {}).get("overlap_moe_a2a", True))


@dataclass
class Plan:
    ranks: int
    out_dir: Path
    variants: List[Variant]
    source: Path


def load_plan(path) -> Plan:
    path = Path(path)
    spec = json.loads(path.read_text())
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(KEYS)}")
    if not spec.get("configs"):
        raise ValueError(f"{path}: \"configs\" must list at least one DeepSpeed config")
    out_dir = Path(spec.get("out_dir", "runs/ablation"))
    variants: List[Variant] = []
    for entry in spec["configs"]:
        source = path.parent / entry
        if not source.is_file():
            raise ValueError(f"{path}: config {entry!r} ({source}) does not exist")
        config = config_files.merge(config_files.load(source), spec.get("shared") or {})
        lm = config.setdefault("lm", {})
        name = lm.get("name") or source.stem
        if any(v.name == name for v in variants):
            raise ValueError(
                f"{path}: two configs are named {name!r} (lm.name): their runs would overwrite each other")
        lm["name"], lm["out_dir"] = name, str(out_dir)
        variants.append(Variant(name, source, config))
    return Plan(int(spec.get("ranks", 4)), out_dir, variants, path)


def _flatten(config: Dict, prefix=()) -> Dict[tuple, object]:
    out = {}
    for key, value in config.items():
        if any((*prefix, key)[:len(k)] == k for k in VARIANT_KEYS):
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def differences(variants: List[Variant]) -> List[str]:
    """Settings other than the schedule's in which a variant differs from the first one."""
    first = _flatten(variants[0].config)
    out = []
    for v in variants[1:]:
        mine = _flatten(v.config)
        for key in sorted(set(first) | set(mine), key=str):
            if first.get(key) != mine.get(key):
                out.append(f"{v.name}: {'.'.join(key)} = {mine.get(key)!r} (the first variant, {variants[0].name}, "
                           f"has {first.get(key)!r})")
    return out


def run(plan: Plan, only: Optional[List[str]] = None, timeout: Optional[float] = None) -> int:
    """Launch each variant (or those named in ``only``) one after the other; returns how many failed."""
    from deepspeed_dualpipe.tools.lm.launch import launch
    for line in differences(plan.variants):
        print(f"[ablate] warning: {line}", flush=True)
    chosen = [v for v in plan.variants if not only or v.name in only]
    missing = sorted(set(only or ()) - {v.name for v in plan.variants})
    if missing:
        raise ValueError(f"no variant named {missing}; the variants are {[v.name for v in plan.variants]}")
    failed = 0
    for i, v in enumerate(chosen):
        out = plan.out_dir / v.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)  # a failed run must not report an old result
        config = out / "config.json"
        config.write_text(json.dumps(v.config, indent=1) + "\n")
        print(
            f"[ablate] {i + 1}/{len(chosen)} {v.name}: deepspeed --num_gpus {plan.ranks} examples/train_moe_lm.py "
            f"--deepspeed_config {config}  (log: {out / 'log.txt'})",
            flush=True)
        start = time.perf_counter()
        done = launch(str(config), plan.ranks, log=out / "log.txt", timeout=timeout)
        seconds = time.perf_counter() - start
        if done.returncode or not (out / "metrics.json").is_file():
            failed += 1
            print(f"[ablate]   failed (exit status {done.returncode}) after {seconds:.0f} s; the end of its log:\n" +
                  "\n".join((out / "log.txt").read_text().splitlines()[-15:]),
                  flush=True)
            continue
        m = json.loads((out / "metrics.json").read_text())
        print(
            f"[ablate]   {seconds:.0f} s: final loss {m['final_loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s, "
            f"measured bubble {_bubble(m)}",
            flush=True)
    return failed


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _mean(values) -> Optional[float]:
    values = [v for v in values or () if v is not None]
    return statistics.fmean(values) if values else None


def _bubble(m: Dict) -> str:
    b = (m.get("bubble") or {}).get("measured_per_global_rank")
    return "n/a" if not b else f"{100 * _mean(b):.0f}% ({100 * min(b):.0f}..{100 * max(b):.0f}%)"


def rows(plan: Plan) -> List[Dict]:
    """One row per variant from its ``metrics.json`` (``None`` values where it did not run)."""
    out, reference = [], None
    for v in plan.variants:
        path = plan.out_dir / v.name / "metrics.json"
        row = {
            "variant": v.name,
            "schedule": v.schedule,
            "overlap_moe_a2a": v.overlap,
            "config": str(plan.out_dir / v.name / "config.json"),
            "ran": path.is_file()
        }
        if path.is_file():
            m = json.loads(path.read_text())
            memory = m.get("memory") or {}
            bubble = (m.get("bubble") or {}).get("measured_per_global_rank")
            row.update(engine=m["engine"],
                       losses=m["losses"],
                       final_loss=m["final_loss"],
                       final_val_loss=m["final_val_loss"],
                       tokens_per_s=m["tokens_per_s"],
                       bubble_per_rank=bubble,
                       bubble=_mean(bubble),
                       activation_bytes_per_rank=memory.get("peak_activation_bytes_per_rank"),
                       parameter_bytes_per_rank=memory.get("parameter_bytes_per_rank"),
                       left_bytes_per_rank=memory.get("bytes_left_after_step"),
                       wall_seconds=m.get("wall_seconds"))
            reference = reference or row
            row["reference"] = reference["variant"]
            row["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], reference["losses"]))
        out.append(row)
    return out


def _mib_range(values) -> str:
    if not values:
        return "n/a"
    lo, hi = min(values) / 2**20, max(values) / 2**20
    return f"{hi:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{hi:.2f} ({lo:.2f}..{hi:.2f})"


def _mib_max(values) -> str:
    return "n/a" if not values else f"{max(values) / 2**20:.2f}"


def markdown(plan: Plan, table: List[Dict], command: str) -> str:
    ran = [r for r in table if r["ran"]]
    first = next((json.loads((plan.out_dir / r["variant"] / "metrics.json").read_text()) for r in ran), None)
    lines = [f"# Ablation: {plan.source}", "", f"`{command}`", ""]
    if first:
        lines += [
            f"{first['world_size']} ranks: pipeline P={first['pipeline_stages']} x data-parallel "
            f"DP={first['data_parallel']}, expert-parallel EP={first['expert_parallel']}; "
            f"M={first['micro_batches']} micro-batches of {first['micro_batch_size']} x {first['seq_len']} "
            f"bytes; {first['steps']} steps; model {first['blocks']}; seed "
            f"{first['config']['lm']['seed']}; torch {first['versions']['torch']}, "
            f"deepspeed {first['versions']['deepspeed']}.", ""
        ]
    reference = ran[0]["variant"] if ran else "-"
    lines += [
        f"| variant | schedule | engine | MoE a2a overlap | final loss | final val loss | max rel. loss diff "
        f"vs {reference} (all steps) | tokens/s | measured bubble, mean (min..max rank) | peak activation "
        f"MiB/rank, max (min..max) | left after step MiB/rank, max | parameter MiB/rank, max (min..max) |",
        "|---|---|---|:-:|--:|--:|--:|--:|--:|--:|--:|--:|"
    ]
    for r in table:
        overlap = "-" if r["overlap_moe_a2a"] is None else ("on" if r["overlap_moe_a2a"] else "off")
        if not r["ran"]:
            lines.append(f"| {r['variant']} | {r['schedule']} | - | {overlap} | did not run (see its log.txt) "
                         f"| | | | | | | |")
            continue
        bubble = r["bubble_per_rank"]
        lines.append(f"| {r['variant']} | {r['schedule']} | {r['engine']} | {overlap} | {r['final_loss']:.6f} | "
                     f"{r['final_val_loss']:.6f} | {r['max_rel_loss_diff']:.1e} | {r['tokens_per_s']:.0f} | " +
                     ("n/a" if not bubble else
                      f"{100 * r['bubble']:.0f}% ({100 * min(bubble):.0f}..{100 * max(bubble):.0f}%)") +
                     f" | {_mib_range(r['activation_bytes_per_rank'])} | {_mib_max(r.get('left_bytes_per_rank'))} | "
                     f"{_mib_range(r['parameter_bytes_per_rank'])} |")
    lines += [
        "", "- **final loss**: training loss of the last step (the same batch for every variant); **max rel. loss "
        "diff**: the largest relative difference of any step's training loss from the first variant's.",
        "- **tokens/s**: global tokens per second, from the median step time (warm-up, timed and memory "
        "steps left out); **measured bubble**: the fraction of the timed step in which a rank did not compute "
        "(`bubble.measured_per_global_rank` in metrics.json).",
        "- **peak activation**: measured at the allocator during one step (deepspeed_dualpipe/runtime/memory.py): "
        "the most bytes in use after any instruction beyond what the rank held when the step began "
        "(parameters, optimizer state) and the gradients allocated since; **left after step**: bytes still in use "
        "after the step, gradients excluded; **parameter**: bytes of the rank's parameters (both mirror "
        "copies under dualpipe; this rank's share of the experts).",
        "- Each variant's complete config is `<variant>/config.json` beside this file; it alone reproduces the "
        "run: `deepspeed --num_gpus N examples/train_moe_lm.py --deepspeed_config <variant>/config.json`.", ""
    ]
    return "\n".join(lines)


def plot(table: List[Dict], out: Path, title: str) -> None:
    """Loss curves, throughput, measured bubble and memory per rank, one panel each."""
    from matplotlib.figure import Figure
    ran = [r for r in table if r["ran"]]
    names = [r["variant"] for r in ran]
    colors = [f"C{i}" for i in range(len(ran))]
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    (loss, speed), (bubble, memory) = fig.subplots(2, 2)
    for r, color in zip(ran, colors):
        loss.plot(range(1, len(r["losses"]) + 1), r["losses"], color=color, linewidth=1, label=r["variant"])
    loss.set(xlabel="step", ylabel="training loss (nats/byte)", title="training loss (the curves coincide)")
    loss.legend(fontsize=8, frameon=False)
    speed.barh(names, [r["tokens_per_s"] for r in ran], color=colors)
    speed.set(title="throughput (tokens/s; noisy on a shared CPU)")
    bubble.barh(names, [100 * (r["bubble"] or 0) for r in ran], color=colors)
    bubble.set(title="measured bubble (% of the timed step, mean over ranks)")
    y = list(range(len(ran)))
    memory.barh([i - 0.2 for i in y], [max(r["activation_bytes_per_rank"] or [0]) / 2**20 for r in ran],
                height=0.4,
                color="#1f78b4",
                label="peak activations")
    memory.barh([i + 0.2 for i in y], [max(r["parameter_bytes_per_rank"] or [0]) / 2**20 for r in ran],
                height=0.4,
                color="#e07b10",
                label="parameters")
    memory.set_yticks(y, names)
    memory.set(title="memory per rank, largest rank (MiB)")
    memory.legend(fontsize=8, frameon=False)
    for ax in (speed, bubble, memory):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=100)


def report(plan: Plan, command: str) -> List[Dict]:
    table = rows(plan)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(plan, table, command)
    (plan.out_dir / "ablation.md").write_text(text)
    (plan.out_dir / "ablation.json").write_text(json.dumps({"command": command, "variants": table}, indent=1))
    written = [plan.out_dir / "ablation.md", plan.out_dir / "ablation.json"]
    try:
        plot(table, plan.out_dir / "ablation.png", command)
        written.append(plan.out_dir / "ablation.png")
    except ImportError:
        print("[ablate] no plot: plotting needs matplotlib: pip install 'deepspeed-dualpipe[plot]'", file=sys.stderr)
    print(text, flush=True)
    print(f"[ablate] wrote {', '.join(map(str, written))}", flush=True)
    return table


def main(path: str,
         only: Optional[List[str]] = None,
         report_only: bool = False,
         timeout: Optional[float] = None) -> int:
    plan = load_plan(path)
    command = f"python -m deepspeed_dualpipe ablate {path}" + (f" --only {','.join(only)}" if only else "")
    start = time.perf_counter()
    failed = 0 if report_only else run(plan, only, timeout)
    report(plan, command)
    if not report_only:
        print(f"[ablate] {len(only or plan.variants)} variant(s) in {time.perf_counter() - start:.0f} s" +
              (f", {failed} failed" if failed else ""),
              flush=True)
    return 1 if failed else 0
