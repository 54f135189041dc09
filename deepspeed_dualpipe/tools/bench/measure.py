"""Step time, busy time, bubble, plugin overhead and activation memory from the ranks' records.

Per-rank figures are per pipeline rank: with data parallelism (the ``--a2a`` runs) the replicas
of a pipeline rank are averaged (bubble, busy and layer time) or maxed (memory).
"""

import statistics
from typing import Dict, List

# Compute instructions: those that run layers. Their time minus the time they waited on a peer is
# the rank's busy time (layer time plus the engine's own work around it, e.g. autograd bookkeeping,
# and the MoE all-to-alls, which the simulator's F and B include). Loads, sends, receives, commits,
# gradient reductions and the optimizer step are not compute: the simulator has no cost for them,
# so their time shows up as bubble.
COMPUTE = {"ForwardPass", "BackwardPass", "BackwardInput", "BackwardWeight", "OverlappedForwardBackward"}

# The allocator-level memory of each rank (runtime/memory.py), as ``<key>_bytes`` per pipeline rank.
MEMORY_FIELDS = {
    "peak_activation": "peak",
    "high_water": "high_water",
    "left_after_step": "left",
    "parameter": "parameters"
}


def step_time(ranks: List[dict]) -> float:
    """From the first rank leaving the barrier to the last rank finishing ``train_batch``."""
    return max(r["end"] for r in ranks) - min(r["start"] for r in ranks)


def busy(step: dict) -> float:
    return sum(end - start - waited for name, start, end, waited, *_ in step["records"] if name in COMPUTE)


def layer_time(step: dict) -> float:
    return sum(r[4] for r in step["records"])


def a2a_wait_time(step: dict) -> float:
    return sum(r[5] for r in step["records"])


def bubble_fractions(ranks: List[dict]) -> List[float]:
    span = step_time(ranks)
    return [(span - busy(r)) / span for r in ranks]


def overheads(step: dict, plugin: bool) -> List[float]:
    """Per instruction: engine time not spent in layers, waiting on peers or blocked in all-to-alls.

    DeepSpeed's own engines do not separate waiting from their blocking communication, so for
    them only compute instructions (which never wait there) are counted.
    """
    return [
        end - start - waited - layer - a2a for name, start, end, waited, layer, a2a in step["records"]
        if plugin or name in COMPUTE
    ]


def _by_stage(values: List[float], stages: List[int], reduce=statistics.mean) -> List[float]:
    """One value per pipeline rank from one value per global rank."""
    return [reduce([v for v, s in zip(values, stages) if s == stage]) for stage in sorted(set(stages))]


def summarize(per_rank: List[dict], label: str, plugin: bool) -> dict:
    """Median step time, per-pipeline-rank bubble (median over repeats), median overhead and peak
    activation bytes for one run."""
    stages = [r["stage"] for r in per_rank]
    repeats = len(per_rank[0]["steps"][label])
    steps = [[rank["steps"][label][i] for rank in per_rank] for i in range(repeats)]
    times = [step_time(s) for s in steps]
    bubbles = [bubble_fractions(s) for s in steps]
    over = [o for s in steps for r in s for o in overheads(r, plugin)]
    a2a = [t for s in steps for r in s for t in r.get("a2a_s", ())]

    def per_rank_median(of):
        return _by_stage([statistics.median(of(s[r]) for s in steps) for r in range(len(per_rank))], stages)

    # CPU time of all ranks (every thread of their processes) over the step's wall time: the cores the
    # run kept busy. Near the machine's core count the ranks compete for CPU and the timings stretch.
    cores = [sum(r["cpu_s"] for r in s) / step_time(s) for s in steps]
    return {
        "step_s": statistics.median(times),
        "cores_used": statistics.median(cores),
        "bubble": _by_stage([statistics.median(b[r] for b in bubbles) for r in range(len(per_rank))], stages),
        "busy_s": per_rank_median(busy),
        "layer_s": per_rank_median(layer_time),
        "a2a_wait_s": per_rank_median(a2a_wait_time),
        "a2a_median_s": statistics.median(a2a) if a2a else None,
        "overhead_ms": 1e3 * statistics.median(over) if over else None,
        "overhead_mean_ms": 1e3 * statistics.mean(over) if over else None,
        "instructions": sum(len(r["records"]) for r in steps[0]),
        **{
            f"{key}_bytes": _by_stage([r["memory"][label][field] for r in per_rank], stages, reduce=_max)
            for key, field in MEMORY_FIELDS.items()
        }
    }


def _max(values):
    """The largest value; ``None`` if any is (a figure the meter does not read there)."""
    return None if any(v is None for v in values) else max(values)


def all_to_all_alone(per_rank: List[dict]) -> Dict[str, float]:
    """Median over ranks of the calibration: one all-to-all alone, and with every stage's at once."""
    cal = [r["a2a"] for r in per_rank if r.get("a2a")]
    if not cal:
        return {}
    return {key: statistics.median(c[key] for c in cal) for key in ("alone", "concurrent")}
