"""Schedules as pictures: one row per rank, time to the right, like Figure 5 of the DeepSeek-V3 report.

Every compute interval is a cell holding its micro-batch number; ``F``, ``B``, ``I``
and ``W`` have their own colour, light for chunk 0 and dark for chunk 1 (the forward
and reverse directions of DualPipe, the two arms of DualPipeV's V). An overlapped
``F&B`` pair is one cell with a heavy border: its forward on the top half, its
backward on the bottom half. Idle time stays white. Needs matplotlib (the ``plot`` extra).
"""

from pathlib import Path
from typing import Optional

from deepspeed_dualpipe.analysis.symbolic import Costs, Execution

FORMATS = {".png": "png", ".svg": "svg"}
NAMES = {"F": "forward", "B": "backward", "I": "backward for input", "W": "backward for weights"}
COLOURS = {  # op -> (chunk 0, chunk 1)
    "F": ("#fbd38d", "#e07b10"),
    "B": ("#a8dba8", "#2e8b57"),
    "I": ("#a6d8f0", "#1f78b4"),
    "W": ("#d4bde8", "#7b4fa6"),
}
CHUNKS = {
    "linear": ("", ""),
    "bidirectional": (" (forward direction)", " (reverse direction)"),
    "v": (" (chunk 0, down the V)", " (chunk 1, back up the V)")
}
INCH_PER_UNIT, MAX_WIDTH, INCH_PER_RANK = 0.3, 60.0, 0.5


def _format(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if not suffix:
        raise ValueError(f"cannot tell the picture format of {out!r}: give it a .png or .svg extension")
    if suffix not in FORMATS:
        raise ValueError(f"unsupported picture format {suffix!r} in {out!r}: use .png or .svg")
    return FORMATS[suffix]


def _number(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.2f}"


def summary(execution: Execution) -> str:
    """``"makespan 27  bubble/rank 3..4"``: what the default titles say about a timeline."""
    bubbles = execution.bubbles() or [0.0]
    lo, hi = min(bubbles), max(bubbles)
    bubble = _number(lo) if lo == hi else f"{_number(lo)}..{_number(hi)}"
    return f"makespan {_number(execution.makespan)}  bubble/rank {bubble}"


def plot_timeline(schedule: str,
                  stages: int,
                  micro_batches: int,
                  costs: Costs,
                  out: str,
                  title: Optional[str] = None) -> str:
    """Simulate ``schedule`` with ``costs`` and draw its timeline to ``out`` (.png or .svg); returns ``out``."""
    from deepspeed_dualpipe.analysis.simulate import simulate

    _format(out)  # fail before simulating
    execution = simulate(schedule, stages, micro_batches, costs).execution
    if title is None:
        title = f"{schedule}  P={stages}  M={micro_batches}  {summary(execution)}"
    return plot_execution(execution, out, title)


def plot_execution(execution: Execution, out: str, title: Optional[str] = None) -> str:
    """Draw any timeline of :class:`~deepspeed_dualpipe.analysis.symbolic.Interval` (simulated or measured)."""
    fmt = _format(out)
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'deepspeed-dualpipe[plot]'") from error
    # A bare Figure renders through Agg (PNG) or the SVG backend and leaves pyplot's global
    # backend alone: no window opens and an interactive session of the caller is not switched.

    timelines = execution.timelines
    ranks = len(timelines)
    start = min((t[0].start for t in timelines if t), default=0.0)
    span = max(execution.makespan - start, 1e-9)
    width = min(MAX_WIDTH, max(8.0, span * INCH_PER_UNIT + 1.5))
    fig = Figure(figsize=(width, ranks * INCH_PER_RANK + 1.6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlim(start, start + span)
    ax.set_ylim(ranks, 0)  # rank 0 on top
    # Fit two digits in the cells that make up 90% of the busy time (slivers, such as a tiny W,
    # go unlabelled rather than shrink every label), never past 9 pt or below 4 pt.
    points_per_unit = (width - 1.5) * 72 / span
    widths = sorted(i.end - i.start for t in timelines for i in t if i.end > i.start) or [1.0]
    typical, covered = widths[-1], 0.0
    for typical in widths:
        covered += typical
        if covered > 0.1 * sum(widths):
            break
    size = max(4.0, min(9.0, points_per_unit * typical / 1.6, INCH_PER_RANK * 72 * 0.45))

    seen = set()

    def cell(x, y, w, h, op, label_size):
        colour = COLOURS[op.op][op.chunk % 2]
        seen.add((op.op, op.chunk % 2))
        ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, edgecolor="#555555", linewidth=0.4))
        if w * points_per_unit < 0.65 * label_size * len(str(op.micro_batch)):
            return  # no room for the label
        text = "white" if op.chunk % 2 else "black"
        ax.text(x + w / 2, y + h / 2, str(op.micro_batch), ha="center", va="center", fontsize=label_size, color=text)

    pairs = False
    for rank, timeline in enumerate(timelines):
        top, height = rank + 0.08, 0.84
        for interval in timeline:
            x, w, op = interval.start, interval.end - interval.start, interval.op
            if op.op == "FB":
                pairs = True
                cell(x, top, w, height / 2, op.forward, size * 0.85)
                cell(x, top + height / 2, w, height / 2, op.backward, size * 0.85)
                ax.add_patch(Rectangle((x, top), w, height, fill=False, edgecolor="black", linewidth=1.2))
            else:
                cell(x, top, w, height, op, size)

    ax.set_yticks([r + 0.5 for r in range(ranks)], [f"rank {r}" for r in range(ranks)])
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("time")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    chunks = CHUNKS.get(execution.layout.kind, ("", ""))
    handles = [
        Patch(facecolor=COLOURS[op][c], edgecolor="#555555", label=NAMES[op] + chunks[c]) for op in COLOURS
        for c in (0, 1) if (op, c) in seen
    ]
    if pairs:
        handles.append(
            Patch(facecolor="white",
                  edgecolor="black",
                  linewidth=1.2,
                  label="overlapped forward & backward (forward on top)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=9, frameon=False)
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG keeps its labels as text
        fig.savefig(out, format=fmt, dpi=120, bbox_inches="tight")
    return out
