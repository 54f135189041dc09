"""Step time, busy time, bubble and plugin overhead from the ranks' instruction records."""

import statistics
from typing import Dict, List

# Compute instructions: those that run layers. Their time minus the time they waited on a peer is
# the rank's busy time (layer time plus the engine's own work around it, e.g. autograd bookkeeping).
# Loads, sends, receives, commits, gradient reductions and the optimizer step are not compute:
# the simulator has no cost for them, so their time shows up as bubble.
COMPUTE = {"ForwardPass", "BackwardPass", "BackwardInput", "BackwardWeight", "OverlappedForwardBackward"}


def step_time(ranks: List[dict]) -> float:
    """From the first rank leaving the barrier to the last rank finishing ``train_batch``."""
    return max(r["end"] for r in ranks) - min(r["start"] for r in ranks)


def busy(step: dict) -> float:
    return sum(end - start - waited for name, start, end, waited, _ in step["records"] if name in COMPUTE)


def layer_time(step: dict) -> float:
    return sum(layer for *_, layer in step["records"])


def bubble_fractions(ranks: List[dict]) -> List[float]:
    span = step_time(ranks)
    return [(span - busy(r)) / span for r in ranks]


def overheads(step: dict, plugin: bool) -> List[float]:
    """Per instruction: engine time not spent in layers or waiting on peers.

    DeepSpeed's own engines do not separate waiting from their blocking communication, so for
    them only compute instructions (which never wait there) are counted.
    """
    return [end - start - waited - layer for name, start, end, waited, layer in step["records"]
            if plugin or name in COMPUTE]


def summarize(per_rank: List[Dict[str, List[dict]]], schedule: str, plugin: bool) -> dict:
    """Median step time, per-rank bubble (median over repeats) and median overhead for one schedule."""
    repeats = len(per_rank[0][schedule])
    steps = [[rank[schedule][i] for rank in per_rank] for i in range(repeats)]
    times = [step_time(s) for s in steps]
    bubbles = [bubble_fractions(s) for s in steps]
    over = [o for s in steps for r in s for o in overheads(r, plugin)]

    def per_rank_median(of):
        return [statistics.median(of(s[r]) for s in steps) for r in range(len(per_rank))]

    return {"step_s": statistics.median(times),
            "bubble": [statistics.median(b[r] for b in bubbles) for r in range(len(per_rank))],
            "busy_s": per_rank_median(busy), "layer_s": per_rank_median(layer_time),
            "overhead_ms": 1e3 * statistics.median(over) if over else None,
            "instructions": sum(len(r["records"]) for r in steps[0])}
