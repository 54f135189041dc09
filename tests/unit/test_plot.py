import re
import sys

import pytest

pytest.importorskip("matplotlib")

from deepspeed_dualpipe.analysis.symbolic import Costs  # noqa: E402
from deepspeed_dualpipe.analysis.plot import plot_execution, plot_timeline  # noqa: E402
from deepspeed_dualpipe.schedule import SCHEDULES  # noqa: E402
from deepspeed_dualpipe.analysis.simulate import simulate  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COSTS = Costs(F=1, B=2, W=1, FB=2.5)


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev", "ds-dualpipev"])
def test_png_and_svg(tmp_path, schedule):
    assert schedule in SCHEDULES
    png = plot_timeline(schedule, 4, 8, COSTS, str(tmp_path / "t.png"))
    data = open(png, "rb").read()
    assert png == str(tmp_path / "t.png") and data.startswith(PNG_SIGNATURE) and len(data) > 1000

    svg = plot_timeline(schedule, 4, 8, COSTS, str(tmp_path / "t.svg"))
    text = open(svg, encoding="utf-8").read()
    assert "<svg" in text
    labels = set(re.findall(r">\s*(\d+)\s*</text>", text))
    assert {str(m) for m in range(8)} <= labels, labels
    assert schedule in text and "makespan" in text  # the default title


def test_title_and_measured_timeline(tmp_path):
    execution = simulate("dualpipe", 4, 8, COSTS).execution
    for timeline in execution.timelines:  # as if measured: shifted clock, not starting at 0
        for interval in timeline:
            interval.start += 100.0
            interval.end += 100.0
    out = plot_execution(execution, str(tmp_path / "m.svg"), title="measured on 4 ranks")
    assert "measured on 4 ranks" in open(out, encoding="utf-8").read()


@pytest.mark.parametrize("out, message", [("timeline", "give it a .png or .svg extension"),
                                          ("timeline.pdf", "unsupported picture format '.pdf'")])
def test_bad_extension(tmp_path, out, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plot_timeline("1f1b", 2, 2, COSTS, str(tmp_path / out))
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=re.escape("pip install 'deepspeed-dualpipe[plot]'")):
        plot_timeline("1f1b", 2, 2, COSTS, str(tmp_path / "t.png"))
