"""What overlapped in a pair (runtime/overlap.py), from phases the step drivers record with each
all-to-all's completion. Here the all-to-alls are stand-ins that complete on a timer thread, like gloo's
on its own thread; tests/distributed/test_moe_layer_ranks.py and test_moe_equivalence.py do it with real
all-to-alls between ranks, through the engine."""

import threading
import time

import torch

from deepspeed_dualpipe.runtime.autograd.steps import interleave, run
from deepspeed_dualpipe.runtime.autograd.tape import Pending
from deepspeed_dualpipe.runtime.overlap import hidden_all_to_alls, hidden_seconds, pairs
from tests.helpers.serialised import serialised_interleave

COMM_S, COMPUTE_S = 0.02, 0.06


class _TimedWork:
    """A collective that completes ``seconds`` after its launch, on another thread."""

    def __init__(self, seconds):
        self._future = torch.futures.Future()
        threading.Timer(seconds, self._future.set_result, (None, )).start()

    def wait(self, timeout=None):
        self._future.wait()
        return True

    def get_future(self):
        return self._future


def _micro_batch(steps=3):
    for i in range(steps):
        time.sleep(COMPUTE_S)  # compute (sleeping: it leaves the other thread the CPU)
        pending = Pending(torch.zeros(1), _TimedWork(COMM_S), f"a2a{i}")
        yield pending
        pending.wait()
    return "done"


def _recorded(order):
    events = []
    if order == "interleaved":
        assert interleave(_micro_batch(), _micro_batch(), events, ("A", "B")) == ("done", "done")
    elif order == "serialised":
        serialised_interleave(_micro_batch(), _micro_batch(), events, ("A", "B"))
    else:
        run(_micro_batch(), events, "A")
        run(_micro_batch(), events, "B")
    return events


def test_interleaved_all_to_alls_complete_under_the_other_micro_batchs_compute_and_only_then():
    recorded = {order: _recorded(order) for order in ("interleaved", "in turn", "serialised")}
    for events in recorded.values():
        assert sum(not label.endswith(":compute") for label, _, _ in events) == 6  # every order records all
    assert len(hidden_all_to_alls(recorded["interleaved"])) == 5  # B's last has no A compute left after it
    assert hidden_seconds(recorded["interleaved"]) > 5 * COMM_S * 0.5
    assert hidden_all_to_alls(recorded["in turn"]) == [] and hidden_seconds(recorded["in turn"]) == 0
    assert hidden_all_to_alls(recorded["serialised"]) == [] and hidden_seconds(recorded["serialised"]) == 0


def test_an_all_to_all_counts_when_it_completes_not_when_it_is_waited_for():
    """A's all-to-all completes during B's compute, and A waits for it only later: hidden. Stamping the end
    at the wait (the old test's measure) would put it after B's compute, and every order would look alike."""
    events = [("A:compute", 0.0, 1.0), ("A:dispatch", 1.0, 1.5), ("B:compute", 1.01, 2.0), ("A:compute", 2.0, 3.0)]
    assert [e[0] for e in hidden_all_to_alls(events)] == ["A:dispatch"]
    waited_late = [("A:compute", 0.0, 1.0), ("A:dispatch", 1.0, 2.5), ("B:compute", 1.01, 2.0)]
    assert hidden_all_to_alls(waited_late) == []


def test_time_spent_waiting_or_in_the_own_micro_batch_does_not_hide_an_all_to_all():
    own = [("A:compute", 0.0, 1.0), ("A:dispatch", 0.5, 0.9), ("B:compute", 1.0, 2.0)]
    assert hidden_all_to_alls(own) == []
    # B blocked in its own wait from 1.2 to 1.8: the driver records its compute in two pieces around it
    gap = [("B:compute", 0.0, 1.0), ("B:combine", 0.9, 1.8), ("A:compute", 1.0, 1.2), ("A:dispatch", 1.1, 1.5),
           ("A:compute", 1.8, 2.0)]
    assert hidden_all_to_alls(gap) == [] and hidden_seconds(gap) > 0  # in flight under A, but completed in a wait


def test_phases_are_grouped_by_pair():
    events = [("B0.0:compute", 0, 1), ("F3.1:compute", 1, 2), ("B0.0:combine.grad", 1, 1.5), ("B1.0:compute", 3, 4),
              ("F4.1:compute", 4, 5)]
    assert [len(p) for p in pairs(events)] == [3, 2]
