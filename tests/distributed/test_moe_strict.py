"""The MoE equivalence run (pipeline 2 x data 2 x expert 2, tests/distributed/test_moe_equivalence.py) in strict
mode: NCCL's point-to-point rules and the order of operations across communicators (pipeline p2p, expert
all-to-alls, mirror, tied, data-parallel and loss reductions, the clipping norm) checked on every rank. Under
every schedule it still trains to the numbers of one process, and no rank reports a crossed order.
"""

import functools

import pytest

from tests.distributed import test_moe_equivalence as moe
from tests.helpers import harness

STRICT_S = 120  # generous: 4 ranks on 2 shared cores
SHORT_S = 20  # the plant: a crossed order is named at once, this only bounds a mistake
RUNS = (("dualpipe", True), ("dualpipe", False), ("dualpipe", "clipped"), ("dualpipev",
                                                                           True), ("interleaved-1f1b-overlap", True),
        ("1f1b", True), ("zb1p", True), ("interleaved-1f1b", True), ("zbv", True), ("ds-dualpipev", True))


@functools.lru_cache(maxsize=None)
def _strict_launch():
    return harness.run_distributed(moe._train, moe.P * moe.DP, moe.P, RUNS, timeout=1800, strict_p2p=STRICT_S)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, overlap", RUNS)
def test_moe_with_expert_parallelism_trains_like_one_process_with_no_crossed_order(schedule, overlap):
    results = [r[schedule, overlap] for r in _strict_launch()]
    reference = moe._reference(moe.P, results, clip=moe.CLIP if overlap == "clipped" else 0.0)
    harness.compare(results, reference)


# ----- the plant: one rank joins a pipeline-group barrier before the mirror reduction, the others after ---------


def _train_crossed(P, runs):
    """moe._train with DualPipeEngine's mirror reduction planted: global rank 0 issues a barrier on its pipeline
    group before the reduction over the mirror holders, every other rank after it (its pipeline partner shares
    both communicators). Returns (error kind, message)."""
    import deepspeed.comm as dist
    from deepspeed_dualpipe.runtime.engine import DualPipeEngine
    from deepspeed_dualpipe.schedule.instructions import ReduceMirrorGrads
    reduce = DualPipeEngine._INSTRUCTION_MAP[ReduceMirrorGrads]

    def planted(self):
        if dist.get_rank() == 0:
            dist.barrier(group=self.grid.get_pipe_parallel_group())
        reduce(self)
        if dist.get_rank() != 0:
            dist.barrier(group=self.grid.get_pipe_parallel_group())

    DualPipeEngine._INSTRUCTION_MAP[ReduceMirrorGrads] = planted  # the engine dispatches through this table
    return harness.outcome(lambda: moe._train(P, runs))[:2]


@pytest.mark.slow
def test_the_plant_a_barrier_crossed_with_the_mirror_reduction_is_named_on_the_ranks_that_cross():
    outcomes = harness.run_distributed(_train_crossed,
                                       moe.P * moe.DP,
                                       moe.P, (("dualpipe", True), ),
                                       timeout=600,
                                       strict_p2p=SHORT_S)
    kinds = [kind for kind, _ in outcomes]
    assert set(kinds) == {"StrictOrderError"}, outcomes
    # the pipeline group [0, 2] had a barrier at start-up (#0); the mirror holders at P=2 are all four ranks
    for _, message in outcomes:
        for words in ("ranks 0 and 2 issue their operations on two communicators they share in different orders",
                      "barrier #1 on communicator [0, 2]", "all_reduce #0 on communicator [0, 1, 2, 3]"):
            assert words in message, outcomes
