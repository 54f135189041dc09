"""A peer that never sends, or dies, makes the others fail within ``dualpipe.p2p_timeout_s``.

Two ranks. Pipeline rank 1 builds its engine (so the start-up collectives complete) and then
misbehaves; pipeline rank 0 trains and must raise a ``PipelineCommError`` naming itself, the peer,
what it waited for and the micro-batch, instead of hanging. One launch per behaviour (process
start-up dominates), each scenario's steps reported back and checked by its own test:

* "silent" (schedule dualpipe, timeout 2 s): rank 1 sleeps instead of training. gloo gives up
  after the timeout, and closes its connection to rank 1 as it does.
* "dies" (schedule dualpipev, timeout 5 s): rank 1 ``os._exit(1)``s shortly after start-up, while
  rank 0 waits for it. gloo sees the connection drop at once; the error must say so (not claim a
  timeout) and come well before the timeout. Then the next batch, which starts with the peer
  already dead, must fail the same way.
"""

import functools
import os
import time

import pytest

from tests.helpers import harness
from deepspeed_dualpipe.testing.launch import run_ranks

SILENT_TIMEOUT_S = 2
DIES_TIMEOUT_S = 5
DIES_AFTER_S = 1  # rank 1 dies this long after start-up, while rank 0 waits for its first message
SLACK_S = 8  # an error may come this much later than the timeout (2 cores, busy machine)


def _config(schedule, timeout_s):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        },
        "dualpipe": {
            "p2p_timeout_s": timeout_s
        }
    }


def _misbehave(schedule, timeout_s, behaviour):
    """Runs in every rank. Pipeline rank 1 misbehaves; pipeline rank 0 reports what each step raised."""
    engine = harness.tied_engine(_config(schedule, timeout_s), 2, seed=0)
    if engine.stage_id == 1:
        if behaviour == "dies":
            time.sleep(DIES_AFTER_S)
            os._exit(1)  # hard death: no cleanup, the kernel closes the sockets
        time.sleep(3 * timeout_s)  # alive, but never calls train_batch, so never sends or receives
        return None
    batch = harness.make_batches(0, 1, 1, 4, 2)[0][0]
    steps = {"train_batch": harness.outcome(lambda: engine.train_batch(data_iter=iter(batch)))}
    # The batch failed before its end, where the engine waits for its sends: wait for them as it would.
    steps["pending sends"] = len(engine._send_reqs)
    steps["drain sends"] = harness.outcome(engine._drain_sends)
    if behaviour == "dies":
        steps["next batch"] = harness.outcome(lambda: engine.train_batch(data_iter=iter(batch)))
    return steps


@functools.lru_cache(maxsize=None)
def _silent():
    return harness.run_distributed(_misbehave, 2, "dualpipe", SILENT_TIMEOUT_S, "silent", timeout=120)[0]


@functools.lru_cache(maxsize=None)
def _dies():
    results, codes = run_ranks(_misbehave, 2, "dualpipev", DIES_TIMEOUT_S, "dies", dies=(1, ), timeout=120)
    assert codes == {1: 1}, codes
    return results[0]


def _names_both_ranks(kind, message, schedule, expected):
    assert kind == expected, f"rank 0 raised {kind}: {message}"
    assert message.startswith("pipeline rank 0 (global rank 0) "), message
    assert "pipeline rank 1 (global rank 1)" in message, message
    assert f"schedule {schedule}" in message, message


@pytest.mark.slow
def test_a_peer_that_never_sends_fails_the_wait_after_the_timeout_naming_both_ranks():
    kind, message, elapsed = _silent()["train_batch"]
    _names_both_ranks(kind, message, "dualpipe", "PeerTimeout")
    assert any(f"gave up waiting for {what} of micro-batch " in message
               for what in ("the activation", "the gradient", "the shapes of the activations")), message
    assert f"s (dualpipe.p2p_timeout_s={SILENT_TIMEOUT_S:g})" in message and "raise dualpipe.p2p_timeout_s" in message
    assert SILENT_TIMEOUT_S - 0.1 <= elapsed < SILENT_TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"


@pytest.mark.slow
def test_sends_to_a_peer_that_never_receives_fail_too():
    steps = _silent()
    assert steps["pending sends"] > 0  # rank 0 sent activations before it had to wait
    kind, message, elapsed = steps["drain sends"]
    _names_both_ranks(kind, message, "dualpipe", "PeerTimeout")
    assert "sent to be received by" in message, message
    assert elapsed < SILENT_TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"


@pytest.mark.slow
def test_a_peer_that_dies_fails_the_wait_at_once_saying_it_may_have_died():
    kind, message, elapsed = _dies()["train_batch"]
    _names_both_ranks(kind, message, "dualpipev", "PeerLost")
    assert "lost its connection to pipeline rank 1" in message and "died" in message, message
    assert " of micro-batch " in message, message
    assert elapsed < DIES_TIMEOUT_S, f"took {elapsed:.1f} s: the death was not noticed before the timeout"


@pytest.mark.slow
def test_sends_to_a_dead_peer_do_not_hang_the_end_of_the_batch():
    kind, message, elapsed = _dies()["drain sends"]
    assert kind in ("no error", "PeerLost", "PeerTimeout"), f"{kind}: {message}"  # sent before the death, or failed
    if kind != "no error":
        _names_both_ranks(kind, message, "dualpipev", kind)
    assert elapsed < DIES_TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"


@pytest.mark.slow
def test_the_next_batch_after_a_peer_died_fails_naming_the_peer_too():
    kind, message, elapsed = _dies()["next batch"]
    _names_both_ranks(kind, message, "dualpipev", "PeerLost")
    assert "died" in message, message
    assert elapsed < DIES_TIMEOUT_S + SLACK_S, f"took {elapsed:.1f} s"
