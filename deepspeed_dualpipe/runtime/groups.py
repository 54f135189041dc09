"""The process groups DualPipe adds to DeepSpeed's: who holds a copy of what.

``torch.distributed.new_group`` is a collective: every rank calls it for every group, in the same order, with the
same members, ranks outside the group included. The lists below are therefore functions of what every rank knows
alike (DeepSpeed's topology, and the expert-data-parallel groups gathered from every rank), never of the calling
rank's own coordinates: DeepSpeed's ``grid.stage_to_global(stage_id=s, data=d)`` fills the other axes (tensor
parallelism) from the caller, and groups built from it differ between tensor-parallel ranks, which hangs.
"""

import itertools
from typing import Dict, List, Tuple

from deepspeed import comm as dist


def mirror_rank_lists(topology) -> Tuple[List[List[int]], List[List[int]]]:
    """DualPipe's groups on DeepSpeed's ``topology`` (a ``ProcessTopology`` with a ``pipe`` axis):

    - mirror pairs: pipeline ranks r and P-1-r at the same coordinate on every other axis, so each tensor-parallel
      shard and each data-parallel replica has its own pair;
    - holders: a mirror pair in every data-parallel replica, one group per coordinate of the remaining axes
      (tensor parallelism): every copy of one shard of a stage.
    """
    axes = topology.get_axis_names()
    P = topology.get_dim("pipe")
    others = [axis for axis in axes if axis != "pipe"]
    outside = [axis for axis in others if axis != "data"]

    def coordinates(names):
        return [dict(zip(names, c)) for c in itertools.product(*(range(topology.get_dim(a)) for a in names))]

    pairs = [[topology.get_rank(pipe=s, **coord) for s in (r, P - 1 - r)] for coord in coordinates(others)
             for r in range(P // 2)]
    data = coordinates(["data"]) if "data" in axes else [{}]
    holders = [
        sorted(topology.get_rank(pipe=s, **coord, **d) for s in (r, P - 1 - r) for d in data)
        for coord in coordinates(outside) for r in range(P // 2)
    ]
    return pairs, holders


def expert_holder_lists(pairs: List[List[int]], expert_data_groups: Dict[str, List[List[int]]]) -> List[List[int]]:
    """Every copy of one expert shard under DualPipe: an expert-data-parallel group (DeepSpeed's, per expert group
    name) together with its mirror image across the pipeline. Sorted, without repeats: the same list on every rank
    when ``expert_data_groups`` holds every rank's groups."""
    mirror = _mirror_map(pairs)
    copies = {_with_mirror(group, mirror) for lists in expert_data_groups.values() for group in lists}
    return [list(ranks) for ranks in sorted(copies)]


def create_expert_holder_groups(pairs: List[List[int]]) -> Dict[str, object]:
    """After DeepSpeed has made its expert groups: one process group per expert group name holding every copy of
    this rank's expert shards (:func:`expert_holder_lists`), made by every rank alike (DeepSpeed's expert groups
    are gathered from every rank first). Returns {name: group}."""
    from deepspeed.utils import groups
    mine = {
        name: sorted(dist.get_all_ranks_from_group(group))
        for name, group in sorted(groups._get_expert_data_parallel_group_dict().items())
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    gathered = {}
    for per_rank in everyone:
        for name, ranks in per_rank.items():
            gathered.setdefault(name, set()).add(tuple(ranks))
    made = {
        tuple(ranks): dist.new_group(ranks=ranks)
        for ranks in expert_holder_lists(pairs, {
            name: sorted(lists)
            for name, lists in gathered.items()
        })
    }
    mirror = _mirror_map(pairs)
    return {name: made[_with_mirror(ranks, mirror)] for name, ranks in mine.items()}


def _mirror_map(pairs):
    return {a: b for a, b in pairs} | {b: a for a, b in pairs}


def _with_mirror(ranks, mirror) -> Tuple[int, ...]:
    return tuple(sorted(set(ranks) | {mirror[rank] for rank in ranks}))
