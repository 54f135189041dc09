"""The cost-model simulator: the executor run with Table 2's costs, and Table 2 beside it.

Costs are per chunk (one model stage): ``F`` forward, ``B`` full backward, ``W`` its
weight part (an ``I`` costs ``B - W``), ``FB`` an overlapped forward+backward pair.
"PP" in the report's formulas is the number of model stages: P for 1F1B, ZB1P and
DualPipe, 2P for DualPipeV, ZB-V and interleaved 1F1B (which run PP stages on PP/2 ranks).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from deepspeed_dualpipe.analysis.symbolic import Costs, Execution, execute_schedule
from deepspeed_dualpipe.schedule import get_spec


@dataclass(frozen=True)
class Table2Row:
    bubble: str
    bubble_of: Callable[[int, Costs], float]  # (PP, costs) -> bubble
    activations: str  # per device, in micro-batches of one stage
    params: str  # per device, relative to a 1F1B stage of the same PP
    activations_of: Callable[[int], int] = lambda PP: PP


def _dualpipe_bubble(PP: int, c: Costs) -> float:
    return (PP / 2 - 1) * (c.pair + c.B - 3 * c.W)


# Rows of DeepSeek-V3's Table 2, and the two baselines in its notation: PP model stages, costs per
# stage (chunk). Interleaved 1F1B is Megatron's (p-1)(t_f+t_b)/v with p = PP/2 ranks, v = 2 chunks and
# t = 2 chunk costs; its activations are rank 0's warm-up plus one, with M a multiple of P. ZB-V's row
# is what the simulator gives at the costs the schedule is built for (F = B-W = W); docs/schedules.md
# shows where it differs.
TABLE2: Dict[str, Table2Row] = {
    "1f1b":
    Table2Row("(PP-1)(F+B)", lambda PP, c: (PP - 1) * (c.F + c.B), "PP", "1x"),
    "zb1p":
    Table2Row("(PP-1)(F+B-2W)", lambda PP, c: (PP - 1) * (c.F + c.B - 2 * c.W), "PP", "1x"),
    "interleaved-1f1b":
    Table2Row("(PP/2-1)(F+B)", lambda PP, c: (PP / 2 - 1) * (c.F + c.B), "3PP/2-1", "2x", lambda PP: 3 * PP // 2 - 1),
    "zbv":
    Table2Row("(PP/2-1)(F+B-2W)", lambda PP, c: (PP / 2 - 1) * (c.F + c.B - 2 * c.W), "PP", "2x"),
    "dualpipe":
    Table2Row("(PP/2-1)(F&B+B-3W)", _dualpipe_bubble, "PP+1", "2x", lambda PP: PP + 1),
    "dualpipev":
    Table2Row("(PP/2-1)(F&B+B-3W)", _dualpipe_bubble, "PP+1", "2x", lambda PP: PP + 1),
}


def table2_row(schedule: str) -> Optional[Table2Row]:
    """The row of Table 2 that ``schedule`` follows (its class says which), or None."""
    return TABLE2.get(get_spec(schedule).table2)


def table2_activation_ratio(schedule: str, stages: int) -> Optional[float]:
    """Table 2's activation memory per device over 1F1B's on ``stages`` ranks (PP micro-batches of a 1F1B
    stage): a schedule with PP model stages keeps its row's count of micro-batches of one model stage, each
    ``stages / PP`` of a 1F1B stage. dualpipe: (P+1)/P; dualpipev: (2P+1)/(2P) (half-stage units); zb1p: 1.
    ``None`` for a schedule Table 2 has no row for (ds-dualpipev: its row assumes the W split DeepSpeed's lacks)."""
    row = table2_row(schedule)
    if row is None:
        return None
    PP = get_spec(schedule).layout(stages, 2 * stages).model_stages
    return row.activations_of(PP) / PP


@dataclass
class Simulated:
    schedule: str
    stages: int
    micro_batches: int
    costs: Costs
    execution: Execution
    model_stages: int
    param_copies: int

    @property
    def makespan(self) -> float:
        return self.execution.makespan

    @property
    def bubble(self) -> List[float]:
        return self.execution.bubbles()

    @property
    def peak_activations(self) -> List[int]:
        return self.execution.live_peak

    @property
    def formula_bubble(self) -> Optional[float]:
        row = table2_row(self.schedule)
        return None if row is None else row.bubble_of(self.model_stages, self.costs)

    def to_json(self) -> dict:
        return {
            "makespan": self.makespan,
            "bubble": self.bubble,
            "peak_activations": self.peak_activations,
            "param_copies": self.param_copies
        }


def simulate(schedule: str, stages: int, micro_batches: int, costs: Costs = Costs()) -> Simulated:
    execution = execute_schedule(schedule, stages, micro_batches, costs)
    layout = execution.layout
    return Simulated(schedule, stages, micro_batches, costs, execution, layout.model_stages, layout.param_copies)


def _number(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.2f}"


def table(results: List[Simulated]) -> str:
    """The side-by-side text table printed by ``python -m deepspeed_dualpipe simulate``."""
    header = [
        "schedule", "makespan", "bubble/rank (min..max)", "Table 2 bubble", "= formula", "peak act/rank",
        "Table 2 act", "param copies"
    ]
    rows = []
    for s in results:
        row = table2_row(s.schedule)
        lo, hi = min(s.bubble), max(s.bubble)
        act_lo, act_hi = min(s.peak_activations), max(s.peak_activations)
        rows.append([
            s.schedule,
            _number(s.makespan),
            _number(lo) if lo == hi else f"{_number(lo)}..{_number(hi)}",
            row.bubble if row else "-",
            _number(s.formula_bubble) if row else "-",
            str(act_hi) if act_lo == act_hi else f"{act_lo}..{act_hi}",
            f"{row.activations} = {row.activations_of(s.model_stages)}" if row else "-",
            str(s.param_copies),
        ])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
