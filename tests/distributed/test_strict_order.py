"""Strict mode checks the order of operations across communicators (``deepspeed_dualpipe.testing.strict_order``).

On bare collectives over three gloo ranks: a consistent order passes; two ranks that issue their operations on
two communicators they share in different orders are named, with both communicators and both operations,
at once, and the third rank, waiting in the collective, stops with their finding (a crossing of synchronous collectives would hang gloo itself; of asynchronous ones,
and of a send against a collective, plain gloo completes and hides it).
"""

import functools

import pytest
import torch

from tests.helpers import harness

SHORT_S = 3
WORLD = 3
CASES = ("consistent", "crossed", "crossed async", "send against a collective")


def _bare(cases):
    """Each case on process groups of its own: A = [0, 1, 2], B = [0, 1]. {case: (error kind, message, values)}."""
    import deepspeed.comm as dist
    from deepspeed_dualpipe.testing import strict_p2p
    rank = dist.get_rank()
    results = {}
    for case in cases:
        a, b = dist.new_group([0, 1, 2]), dist.new_group([0, 1])
        x, y = torch.ones(2), torch.ones(2)

        def run():
            if case == "consistent":  # every rank: A, then (0 and 1) B asynchronously, then A again
                dist.all_reduce(x, group=a)
                work = dist.all_reduce(y, group=b, async_op=True) if rank < 2 else None
                dist.barrier(group=a)
                if work is not None:
                    work.wait()
            elif case == "crossed":  # rank 0: A then B; rank 1: B then A (the plant: NCCL can hang)
                order = {0: (a, b), 1: (b, a), 2: (a, )}[rank]
                for group in order:
                    dist.all_reduce(x, group=group)
            elif case == "crossed async" and rank < 2:  # the same, posted asynchronously, waited at the end
                order = (a, b) if rank == 0 else (b, a)
                works = [dist.all_reduce(x if g is a else y, group=g, async_op=True) for g in order]
                for work in works:
                    work.wait()
            elif case == "crossed async":  # rank 2's part of A
                dist.all_reduce(x, group=a)
            elif case == "send against a collective" and rank < 2:
                # rank 0 sends to rank 1 and then joins B; rank 1 joins B and then receives
                if rank == 0:
                    sent = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, 1)])
                    dist.all_reduce(y, group=b)
                    for work in sent:
                        work.wait()
                else:
                    dist.all_reduce(y, group=b)
                    for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, x, 0)]):
                        work.wait()

        results[case] = harness.outcome(run)[:2] + (x.tolist() + y.tolist(), )
        if strict_p2p.installed():
            strict_p2p.reset_order()  # a failed case leaves its operations unmatched: the next one starts afresh
    return results


@functools.lru_cache(maxsize=None)
def _outcomes(strict):
    cases = CASES if strict else ("consistent", "crossed async", "send against a collective")
    return harness.run_distributed(_bare, WORLD, cases, timeout=240, strict_p2p=SHORT_S if strict else None)


@pytest.mark.slow
def test_a_consistent_order_on_two_communicators_passes_with_the_numbers_of_plain_gloo():
    strict, plain = _outcomes(True), _outcomes(False)
    assert [r["consistent"][0] for r in strict] == ["no error"] * WORLD, [r["consistent"] for r in strict]
    assert [r["consistent"] for r in strict] == [r["consistent"] for r in plain]
    assert strict[0]["consistent"][2] == [3.0, 3.0, 2.0, 2.0]


def _named(outcome, *words):
    kind, message, _ = outcome
    return kind == "StrictOrderError" and all(w in message for w in words)


@pytest.mark.slow
def test_a_crossed_order_of_blocking_collectives_names_both_ranks_and_communicators_instead_of_hanging():
    outcomes = [r["crossed"] for r in _outcomes(True)]
    for rank in (0, 1):
        assert _named(outcomes[rank], "ranks 0 and 1", "communicator [0, 1, 2]", "communicator [0, 1]",
                      "all_reduce #0", "different orders"), outcomes[rank]
    # rank 2 shares only A with them: it waits in A until they have compared, and stops with their finding
    assert _named(outcomes[2], "rank 2 stops: another rank found a crossed order", "ranks 0 and 1"), outcomes[2]


@pytest.mark.slow
def test_a_crossed_order_of_asynchronous_collectives_passes_plain_gloo_and_is_named_by_strict_mode():
    assert [r["crossed async"][0] for r in _outcomes(False)] == ["no error"] * WORLD
    outcomes = [r["crossed async"] for r in _outcomes(True)]
    for rank in (0, 1):
        assert _named(outcomes[rank], "ranks 0 and 1", "communicator [0, 1]", "communicator [0, 1, 2]"), outcomes


@pytest.mark.slow
def test_a_send_issued_before_a_collective_that_its_receiver_joins_first_is_a_crossed_order():
    assert [r["send against a collective"][0] for r in _outcomes(False)] == ["no error"] * WORLD
    outcomes = [r["send against a collective"] for r in _outcomes(True)]
    for rank in (0, 1):
        assert _named(outcomes[rank], "ranks 0 and 1", "the point-to-point communicator of ranks [0, 1]", "send #0",
                      "communicator [0, 1]"), outcomes
