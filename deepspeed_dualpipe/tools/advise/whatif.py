"""``advise --what-if FILE``: every schedule predicted on paper for a cluster and model that need not exist yet.

The description (JSON, times in seconds, sizes in bytes; see docs/advise.md) gives per-layer costs and
sizes; each schedule's chunk holds ``layers / model stages`` of them (a fraction where they do not split
evenly: an average chunk). Per chunk and micro-batch, for ``k`` layers of which ``k_moe`` are MoE layers:

    F = k F_layer + 2 k_moe a        B = k B_layer + 2 k_moe a        W = k W_layer

with ``a`` one all-to-all (a dispatch, a combine, and their gradients in the backward):
``latency + a2a_bytes (ep_size - 1) / ep_size / link_bandwidth`` (the share that leaves the rank).
Overlapped pairs (dualpipe, dualpipev) interleave their all-to-alls with the other micro-batch as the
engine does (:func:`~deepspeed_dualpipe.tools.bench.predict.overlapped_pair`). The simulator then gives
the step, the bubble and the live (chunk, micro-batch) activations per rank; memory per rank is those
times ``k`` layers' activation bytes, plus ``k`` layers' parameter bytes per chunk copy it holds.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from deepspeed_dualpipe.analysis.simulate import simulate
from deepspeed_dualpipe.analysis.symbolic import Costs
from deepspeed_dualpipe.schedule import PAIRED_SCHEDULES, get_spec


@dataclass
class WhatIf:
    stages: int  # P, pipeline ranks
    micro_batches: List[int]  # M to predict
    layers: int
    F: float  # per layer and micro-batch, seconds of computing (no all-to-all)
    B: float  # full backward
    W: float  # its weight part
    moe_layers: int = 0  # how many of the layers run a dispatch and a combine all-to-all
    a2a_bytes: float = 0.0  # one all-to-all's bytes per rank (sent)
    link_bandwidth: float = 0.0  # bytes/s per rank over the link the all-to-all crosses
    ep_size: int = 1  # expert-parallel degree: (ep_size - 1) / ep_size of the bytes leave the rank
    a2a_latency: float = 0.0  # seconds per all-to-all besides the bytes
    activation_bytes_per_layer: float = 0.0  # what one layer keeps per micro-batch from forward to backward
    parameter_bytes_per_layer: float = 0.0  # one copy of a layer's parameters on one rank
    schedules: Optional[List[str]] = None
    name: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def a2a_s(self) -> float:
        if not self.moe_layers or not self.a2a_bytes:
            return 0.0
        return self.a2a_latency + self.a2a_bytes * (self.ep_size - 1) / self.ep_size / self.link_bandwidth


_REQUIRED = ("stages", "micro_batches", "layers", "F", "B", "W")
_LIMITS = {"stages": 64, "micro_batches": 1024}


def load_what_if(path) -> WhatIf:
    """The description in ``path``, or a one-line ValueError naming the file and the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--what-if {path}: cannot read it as JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--what-if {path}: expected a JSON object of keys such as {', '.join(_REQUIRED)}")
    known = set(WhatIf.__dataclass_fields__)
    for key in data:
        if key not in known:
            raise ValueError(f"--what-if {path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    for key in _REQUIRED:
        if key not in data:
            raise ValueError(f"--what-if {path}: key {key!r} is missing")
    if isinstance(data["micro_batches"], int):
        data["micro_batches"] = [data["micro_batches"]]
    w = WhatIf(**data)
    for key, bound in _LIMITS.items():
        values = getattr(w, key) if isinstance(getattr(w, key), list) else [getattr(w, key)]
        if any(not isinstance(v, int) or not 1 <= v <= bound for v in values):
            raise ValueError(
                f"--what-if {path}: {key!r} must be whole numbers from 1 to {bound}, got {getattr(w, key)!r}")
    for key in ("F", "B", "W", "a2a_bytes", "a2a_latency", "activation_bytes_per_layer", "parameter_bytes_per_layer"):
        if not isinstance(getattr(w, key), (int, float)) or getattr(w, key) < 0:
            raise ValueError(f"--what-if {path}: {key!r} must be a number >= 0, got {getattr(w, key)!r}")
    if w.W > w.B:
        raise ValueError(f"--what-if {path}: 'W' (the weight part of the backward) must not exceed 'B'")
    if not 0 <= w.moe_layers <= w.layers:
        raise ValueError(f"--what-if {path}: 'moe_layers' must be from 0 to 'layers' ({w.layers})")
    if w.moe_layers and w.a2a_bytes and not w.link_bandwidth > 0:
        raise ValueError(f"--what-if {path}: 'link_bandwidth' (bytes/s) must be > 0 when there are all-to-alls")
    if not isinstance(w.ep_size, int) or w.ep_size < 1:
        raise ValueError(f"--what-if {path}: 'ep_size' must be a whole number >= 1")
    for name in w.schedules or []:
        get_spec(name)
    return w


@dataclass
class WhatIfRow:
    schedule: str
    micro_batches: int
    step_s: float
    bubble: float  # the busiest rank's idle fraction of the step
    activation_bytes: float  # the largest rank's peak
    parameter_bytes: float  # the largest rank's
    chunk: Costs


def chunk_costs(w: WhatIf, schedule: str) -> Costs:
    K = get_spec(schedule).layout(w.stages, 2 * w.stages).model_stages
    k, k_moe, a = w.layers / K, w.moe_layers / K, w.a2a_s
    pair = None
    if a and schedule in PAIRED_SCHEDULES:
        from deepspeed_dualpipe.tools.bench.predict import overlapped_pair
        n = max(1, round(k_moe))  # the pair interleaves at each MoE layer's all-to-alls
        pair = overlapped_pair(n, k * w.F / n, k * w.B / n, a)
    return Costs(F=k * w.F + 2 * k_moe * a, B=k * w.B + 2 * k_moe * a, W=k * w.W, FB=pair)


def predict_one(w: WhatIf, schedule: str, M: int) -> WhatIfRow:
    spec = get_spec(schedule)
    spec.validate(w.stages, M)
    layout = spec.layout(w.stages, M)
    costs = chunk_costs(w, schedule)
    sim = simulate(schedule, w.stages, M, costs)
    k = w.layers / layout.model_stages
    return WhatIfRow(schedule=schedule,
                     micro_batches=M,
                     step_s=sim.makespan,
                     bubble=max(sim.bubble) / sim.makespan if sim.makespan else 0.0,
                     activation_bytes=max(sim.peak_activations) * k * w.activation_bytes_per_layer,
                     parameter_bytes=layout.param_copies / w.stages * w.layers * w.parameter_bytes_per_layer,
                     chunk=costs)


def predict_what_if(w: WhatIf, schedules: List[str]) -> List[WhatIfRow]:
    rows = []
    for M in w.micro_batches:
        for name in w.schedules or schedules:
            try:
                rows.append(predict_one(w, name, M))
            except ValueError:
                continue  # a shape this schedule does not run
    return rows


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def render(w: WhatIf, rows: List[WhatIfRow]) -> str:
    a = w.a2a_s
    out = [
        f"what-if{' ' + w.name if w.name else ''}: P={w.stages}, {w.layers} layers ({w.moe_layers} MoE), per layer "
        f"F={1e3 * w.F:.2f} ms B={1e3 * w.B:.2f} ms W={1e3 * w.W:.2f} ms; one all-to-all {1e3 * a:.2f} ms "
        f"({w.a2a_bytes / 2**20:.1f} MiB per rank, EP {w.ep_size}, {w.link_bandwidth / 1e9:.0f} GB/s); "
        f"per MoE layer comm:compute = {(4 * a) / (w.F + w.B) if w.F + w.B else math.inf:.2f}"
    ]
    header = [
        "schedule", "M", "step s", "s/micro-batch", "bubble (worst rank)", "activations GiB/rank", "params GiB/rank"
    ]
    table = [[
        r.schedule,
        str(r.micro_batches), f"{r.step_s:.3f}", f"{r.step_s / r.micro_batches:.4f}", f"{100 * r.bubble:.1f}%",
        _gib(r.activation_bytes),
        _gib(r.parameter_bytes)
    ] for r in sorted(rows, key=lambda r: (r.micro_batches, r.step_s))]
    widths = [max(len(row[i]) for row in table + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in [header] + table]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(out + lines)


def as_json(w: WhatIf, rows: List[WhatIfRow]) -> dict:
    return {
        "what_if": {
            k: getattr(w, k)
            for k in WhatIf.__dataclass_fields__
        },
        "a2a_s":
        w.a2a_s,
        "predictions": [{
            "schedule": r.schedule,
            "micro_batches": r.micro_batches,
            "step_s": r.step_s,
            "bubble": r.bubble,
            "activation_bytes": r.activation_bytes,
            "parameter_bytes": r.parameter_bytes,
            "chunk_costs_s": {
                "F": r.chunk.F,
                "B": r.chunk.B,
                "W": r.chunk.W,
                "FB": r.chunk.pair
            }
        } for r in rows]
    }
