"""The order check of strict mode (``deepspeed_dualpipe.testing.strict_order``) in one process: two ranks' checks
share an in-memory store, so the rule is shown without launching ranks (the distributed tests run it for real)."""

import pytest

from deepspeed_dualpipe.testing.strict_order import OrderCheck, StrictOrderError, p2p_streams

A, B, C = "c:1:0,1,2", "c:2:0,1", "c:3:1,2"  # process groups 1, 2 and 3 and their members


class Store:
    """The part of a TCPStore the check uses."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def ranks(n=3, timeout_s=0.2):
    store = Store()
    return [OrderCheck(store, r, timeout_s) for r in range(n)]


def test_one_order_on_two_shared_communicators_passes():
    r0, r1, _ = ranks()
    for check in (r0, r1):
        check.issue([(A, "all_reduce")])
        check.issue([(B, "all_reduce")])


def test_a_crossed_order_is_named_by_the_second_rank_to_issue():
    r0, r1, _ = ranks()
    r0.issue([(A, "all_reduce")])
    r0.issue([(B, "barrier")])
    with pytest.raises(StrictOrderError) as error:
        r1.issue([(B, "barrier")])  # rank 0 had one operation on A before this one, rank 1 none
    assert ("ranks 0 and 1 issue their operations on two communicators they share in different orders: rank 0 "
            "issued all_reduce #0 on communicator [0, 1, 2] (process group 1) before barrier #0 on communicator "
            "[0, 1] (process group 2); rank 1 issued barrier #0") in str(error.value)


def test_communicators_that_share_one_rank_only_never_cross():
    r0, r1, r2 = ranks()
    r1.issue([(B, "all_reduce")])
    r1.issue([(C, "all_reduce")])
    r2.issue([(C, "all_reduce")])  # ranks 1 and 2 share C only: B's order is none of rank 2's business
    r0.issue([(B, "all_reduce")])


def test_a_rank_blocked_in_a_collective_names_the_member_that_went_into_another_one_first():
    r0, r1, _ = ranks()
    r0.issue([(A, "all_reduce")], blocking=True)
    r1.issue([(B, "all_reduce")], blocking=True)
    with pytest.raises(StrictOrderError, match="ranks 0 and 1 issue their operations"):
        r0.arrive(A, 0)  # neither gets to its second collective: without the check both would hang in gloo
    with pytest.raises(StrictOrderError, match="another rank found a crossed order, rank 0: ranks 0 and 1"):
        r1.arrive(B, 0)


def test_a_missing_member_is_named_with_what_it_issued_last_after_the_timeout():
    r0, r1, r2 = ranks()
    for check in (r0, r1):
        check.issue([(A, "all_reduce")], blocking=True)
    r2.issue([(C, "broadcast")])
    with pytest.raises(StrictOrderError,
                       match=r"waited 0.2 s in all_reduce #0 on communicator \[0, 1, 2\] .* for "
                       r"ranks \[2\]: rank 2 last issued broadcast #0 on communicator \[1, 2\]"):
        r0.arrive(A, 0)


def test_a_send_against_a_collective_crosses_but_the_directions_of_one_pair_are_left_to_strict_p2p():
    r0, r1, _ = ranks()
    r0.issue(p2p_streams(0, [("send", 1)]))
    r0.issue([(B, "all_reduce")])
    with pytest.raises(StrictOrderError, match="send #0 on the point-to-point communicator of ranks"):
        r1.issue([(B, "all_reduce")])
    q0, q1, _ = ranks()
    q0.issue(p2p_streams(0, [("send", 1)]))
    q0.issue(p2p_streams(0, [("recv", 1)]))
    q1.issue(p2p_streams(1, [("send", 0), ("recv", 0)]))  # one group on rank 1, two on rank 0: not a crossing here
