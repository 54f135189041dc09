"""Every process group the plugin makes is made by every rank alike: ``new_group`` is a collective, so all ranks
call it for every group, in the same order, with the same members (torch.distributed's rule; a rank that differs
hangs the job at start-up, as dualpipe did under tensor parallelism).

Each rank of a topology is played in turn in this one process: DeepSpeed's own ``PipelineParallelGrid`` is built
for it with ``deepspeed.comm`` answering as that rank, then the plugin makes its groups while every ``new_group``
call is recorded. The records of all ranks must be identical.
"""

import itertools
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from deepspeed import comm as dist
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

from deepspeed_dualpipe.runtime import groups
from deepspeed_dualpipe.runtime.module import DualPipeModule
from deepspeed_dualpipe.schedule import LayoutKind

TOPOLOGIES = [(P, tp, dp) for P in (2, 4) for tp in (1, 2) for dp in (1, 2, 3)]


@contextmanager
def _as_rank(monkeypatch, rank, world, calls=None):
    """``deepspeed.comm`` answering as ``rank`` of ``world``; ``calls`` records each ``new_group``'s members."""
    with monkeypatch.context() as patch:
        patch.setattr(dist, "get_rank", lambda group=None: rank)
        patch.setattr(dist, "get_world_size", lambda group=None: world)

        def new_group(ranks=None, **kwargs):
            if calls is not None:
                calls.append(list(ranks))
            return SimpleNamespace(ranks=list(ranks))

        patch.setattr(dist, "new_group", new_group)
        yield patch


def _mirror_groups_of_every_rank(monkeypatch, P, tp, dp):
    topology = PipeModelDataParallelTopology(num_pp=P, num_mp=tp, num_dp=dp)
    world = P * tp * dp
    calls, made = {}, {}
    for rank in range(world):
        with _as_rank(monkeypatch, rank, world):
            grid = PipelineParallelGrid(topology=topology)
        module = SimpleNamespace(layout_kind=LayoutKind.BIDIRECTIONAL,
                                 _topo=topology,
                                 _grid=grid,
                                 global_rank=rank,
                                 num_stages=P)
        calls[rank] = []
        with _as_rank(monkeypatch, rank, world, calls[rank]):
            made[rank] = DualPipeModule._mirror_groups(module)
    return topology, calls, made


@pytest.mark.parametrize("P,tp,dp", TOPOLOGIES)
def test_every_rank_makes_the_same_mirror_and_holder_groups_in_the_same_order(monkeypatch, P, tp, dp):
    _, calls, _ = _mirror_groups_of_every_rank(monkeypatch, P, tp, dp)
    first = calls[0]
    assert first, "no group made"
    for rank, made in calls.items():
        assert made == first, f"rank {rank} makes groups {made}, rank 0 {first}"


@pytest.mark.parametrize("P,tp,dp", TOPOLOGIES)
def test_each_tensor_parallel_shard_has_its_own_mirror_pair_and_holders(monkeypatch, P, tp, dp):
    topology, _, made = _mirror_groups_of_every_rank(monkeypatch, P, tp, dp)
    for rank, (mirror, holders) in made.items():
        me = topology.get_coord(rank)
        assert sorted(mirror.ranks) == sorted(
            [rank, topology.get_rank(pipe=P - 1 - me.pipe, data=me.data, model=me.model)])
        want = sorted(
            topology.get_rank(pipe=s, data=d, model=me.model) for s in (me.pipe, P - 1 - me.pipe) for d in range(dp))
        assert sorted(holders.ranks) == want


@pytest.mark.parametrize("P,tp,dp,ep", [(P, tp, dp, ep) for P, tp, dp in TOPOLOGIES for ep in (1, 2) if dp % ep == 0])
def test_every_rank_makes_the_same_expert_holder_groups(monkeypatch, P, tp, dp, ep):
    # DeepSpeed's expert-data-parallel groups inside each data-parallel group: every ep-th rank (E + D ordering)
    topology = PipeModelDataParallelTopology(num_pp=P, num_mp=tp, num_dp=dp)
    world = P * tp * dp
    expert_data = {
        r: dp_ranks[i % ep::ep]
        for dp_ranks in topology.get_axis_comm_lists("data")
        for i, r in enumerate(dp_ranks)
    }
    pairs = groups.mirror_rank_lists(topology)[0]
    every_rank = [{f"ep_size_{ep}": sorted(expert_data[r])} for r in range(world)]
    calls, made = {}, {}
    for rank in range(world):
        calls[rank] = []
        with _as_rank(monkeypatch, rank, world, calls[rank]) as patch:
            patch.setattr(groups.dist, "get_all_ranks_from_group", lambda group: group)
            patch.setattr("deepspeed.utils.groups._get_expert_data_parallel_group_dict",
                          lambda: {f"ep_size_{ep}": expert_data[rank]})
            patch.setattr(groups.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), every_rank))
            made[rank] = groups.create_expert_holder_groups(pairs)
    for rank in range(world):
        assert calls[rank] == calls[0], f"rank {rank} makes {calls[rank]}, rank 0 {calls[0]}"
        me = topology.get_coord(rank)
        mirror = topology.get_rank(pipe=P - 1 - me.pipe, data=me.data, model=me.model)
        copies = set(expert_data[rank]) | {
            topology.get_rank(pipe=P - 1 - me.pipe, data=topology.get_coord(r).data, model=me.model)
            for r in expert_data[rank]
        }
        assert sorted(made[rank][f"ep_size_{ep}"].ranks) == sorted(copies)
        assert {rank, mirror} <= copies and len(copies) == 2 * dp // ep


def test_the_lists_depend_on_the_topology_alone_not_on_the_calling_rank():
    topology = PipeModelDataParallelTopology(num_pp=4, num_mp=2, num_dp=2)
    pairs, holders = groups.mirror_rank_lists(topology)
    assert len(pairs) == 2 * 2 * 2 and len(holders) == 2 * 2  # (tp x dp) x P/2 pairs; tp x P/2 holder groups
    assert sorted(itertools.chain(*pairs)) == list(range(16))  # every rank in exactly one pair
    assert sorted(itertools.chain(*holders)) == list(range(16))
