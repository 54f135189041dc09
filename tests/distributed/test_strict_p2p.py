"""Strict mode: NCCL's point-to-point rules emulated on gloo (``deepspeed_dualpipe.testing.strict_p2p``).

gloo buffers sends, so streams that deadlock on NCCL pass on CPU. Under strict mode every schedule
still trains to the numbers of one process, DeepSpeed's own 1F1B and DualPipeV included (the
controls); a stream posted the way the engine used to post (each send and receive its own batch)
fails with a clear error within the strict timeout instead of hanging, although plain gloo trains
it. The emulation itself is checked on bare sends and receives: a group progresses as one, a send
waits for its receive, a crossed order is a deadlock, and a size mismatch is named.
"""

import functools

import pytest
import torch

from tests.helpers import equivalence
from tests.helpers import harness

SHORT_S = 3  # a real deadlock, shown with a short timeout (the training runs use equivalence.STRICT_S)
SLACK_S = 10

EXTRA = ("dualpipe-tuple", "dualpipev-clipped", "zb1p-mask", "dualpipe-mask", "dualpipev-mask")


def _strict_launch(P):
    """test_equivalence's launch at P ranks: it runs in strict mode (one launch serves both files)."""
    return equivalence.launch(P, 1)


@pytest.mark.slow
@pytest.mark.parametrize("P, schedule",
                         [(P, s) for P in (2, 4) for s in equivalence.SCHEDULES] + [(2, r) for r in EXTRA])
def test_every_schedule_trains_like_one_process_under_nccls_point_to_point_rules(P, schedule):
    results = [per_rank[schedule] for per_rank in _strict_launch(P)]
    init = harness.initial_params_from(results)
    batches = harness.make_batches(equivalence.SEED, equivalence.STEPS, 1, equivalence.micro_batches(P),
                                   equivalence.MBS)
    run = equivalence.RUNS[schedule]
    reference = harness.train_reference(equivalence.MODELS[run[1]],
                                        init,
                                        batches,
                                        equivalence.STEPS,
                                        clip=run[3].get("gradient_clipping", 0.0))
    harness.compare(results, reference)


# ----- a planted defect: the engine's old posting, every send and receive its own batch -----------


def _one_op_per_batch(plan):
    """Handshakes.plan, then every op of each group posted on its own, in order (the engine before commits)."""
    from deepspeed_dualpipe.schedule.commit import Posting

    def split(self, queued):
        return [Posting((op, ), posting.wait) for posting in plan(self, queued) for op in posting.ops]

    return split


def _train_unbatched(schedule, P):
    """One batch with the engine's posting split into one op per batch; (error kind, message, seconds of train_batch)."""
    import time
    from deepspeed_dualpipe.schedule.commit import Handshakes
    Handshakes.plan = _one_op_per_batch(Handshakes.plan)  # this rank's process only
    # verify_schedule off: the verifier reads the same plan and would refuse this stream at start-up
    config = equivalence.ds_config(schedule, P, {"p2p_timeout_s": 30, "verify_schedule": False})
    engine = harness.tied_engine(config, P, seed=0)
    batch = harness.make_batches(0, 1, 1, 2 * P, equivalence.MBS)[0][0]
    start = time.monotonic()
    kind, message, _ = harness.outcome(lambda: engine.train_batch(data_iter=iter(batch)))
    return kind, message, time.monotonic() - start


@functools.lru_cache(maxsize=None)
def _unbatched(strict):
    return harness.run_distributed(_train_unbatched, 2, "zb1p", 2, timeout=600, strict_p2p=SHORT_S if strict else None)


@pytest.mark.slow
def test_posting_each_send_and_receive_on_its_own_trains_on_plain_gloo_which_hides_the_deadlock():
    assert [kind for kind, _, _ in _unbatched(strict=False)] == ["no error", "no error"]


@pytest.mark.slow
def test_strict_mode_catches_the_one_op_per_batch_posting_with_a_clear_error_within_its_timeout():
    outcomes = _unbatched(strict=True)
    for kind, message, elapsed in outcomes:
        assert kind in ("PeerTimeout", "StrictP2PError"), (kind, message)
        assert elapsed < SHORT_S + SLACK_S, f"took {elapsed:.1f} s"
    messages = " | ".join(message for _, message, _ in outcomes)
    assert "on NCCL this stream deadlocks" in messages, messages
    assert "send to rank 1 #" in messages and "for rank 1 to post the matching receive" in messages, messages


# ----- the emulation on bare sends and receives -----------------------------------------------------

CASES = ("one group", "crossed", "unreceived send", "sizes")


def _bare(cases):
    """Two ranks; each case on a process group of its own (its own emulated communicator, so that a case that
    breaks its communicator leaves the next one alone). Returns {case: (error kind, message, received)}."""
    import deepspeed.comm as dist
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    results = {}
    for case in cases:
        group = dist.new_group([0, 1])
        # distinct non-zero values on each side, into a buffer holding neither: a receive must show its sender's
        out, into = torch.full((4, ), float(rank + 1)), torch.full((4, ), -1.0)

        def op(kind, tensor):
            return dist.P2POp(kind, tensor, peer, group=group)

        def run():
            if case == "one group":  # send and receive together: both ranks complete
                for request in dist.batch_isend_irecv([op(dist.isend, out), op(dist.irecv, into)]):
                    request.wait()
            elif case == "crossed":  # each rank: its send in one group, then its receive in the next
                sent = dist.batch_isend_irecv([op(dist.isend, out)])
                received = dist.batch_isend_irecv([op(dist.irecv, into)])
                for request in sent + received:
                    request.wait()
            elif case == "unreceived send":  # rank 0 sends, rank 1 never receives
                if rank == 0:
                    dist.batch_isend_irecv([op(dist.isend, out)])[0].wait()
            elif case == "sizes":  # rank 1 receives 8 floats where rank 0 sends 4
                tensor = out if rank == 0 else torch.zeros(8)
                dist.batch_isend_irecv([op(dist.isend if rank == 0 else dist.irecv, tensor)])[0].wait()

        results[case] = harness.outcome(run)[:2] + (into.tolist(), )
    return results


@functools.lru_cache(maxsize=None)
def _bare_outcomes(strict=True):
    cases = CASES if strict else ("crossed", )
    return harness.run_distributed(_bare, 2, cases, timeout=600, strict_p2p=SHORT_S if strict else None)


@pytest.mark.slow
def test_the_emulation_completes_a_send_and_a_receive_posted_in_one_group():
    (kind0, _, got0), (kind1, _, got1) = (r["one group"] for r in _bare_outcomes())
    assert (kind0, kind1) == ("no error", "no error")
    assert got0 == [2.0] * 4 and got1 == [1.0] * 4  # each rank holds what the other sent


@pytest.mark.slow
def test_a_send_then_a_receive_in_two_groups_on_both_ranks_is_a_deadlock_named_by_the_emulation_only():
    assert [r["crossed"][0] for r in _bare_outcomes(strict=False)] == ["no error", "no error"]  # plain gloo
    outcomes = [r["crossed"] for r in _bare_outcomes()]
    assert [kind for kind, _, _ in outcomes] == ["StrictP2PError", "StrictP2PError"], outcomes
    assert all("on NCCL this stream deadlocks" in message for _, message, _ in outcomes), outcomes


@pytest.mark.slow
def test_a_send_completes_only_once_its_receive_is_posted():
    kind, message, _ = _bare_outcomes()[0]["unreceived send"]
    assert kind == "StrictP2PError" and "for rank 1 to post the matching receive" in message, message


@pytest.mark.slow
def test_a_receive_of_another_size_is_named_as_a_different_posting_order():
    kind, message, _ = _bare_outcomes()[0]["sizes"]
    assert kind == "StrictP2PError" and "receive #0 of 32 bytes" in message and "different orders" in message, message
