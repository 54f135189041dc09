"""MoE checkpoints across schedules: which file holds which parameter, whatever the placement.

DeepSpeed saves a pipeline with MoE layers differently from one without: there are no layer files.
Each pipeline rank's ``mp_rank_XX_model_states.pt`` holds that rank's non-expert parameters, and
each expert goes to ``layer_<k>_expert_<e>_mp_rank_XX_model_states.pt``, where ``k`` counts the MoE
layers *on that rank* and ``XX`` is the pipeline rank. Only the placement that wrote them can read
them back: under DualPipe a rank holds two chunks, so its ``k`` and its ``mp_rank`` file mean other
layers than under 1F1B.

So the save also writes, for every pipeline rank, ``dualpipe_moe_mp_rank_XX.json``: the name of its
``k``-th MoE layer and the names of the parameters in its ``mp_rank_XX`` file. The plugin's layers
keep DeepSpeed's global names (``"<layer index>.<path>"``), so a rank of any other placement finds
each of its parameters there (:func:`load_module`). A checkpoint without these maps (written by
DeepSpeed's own ``save_checkpoint``) loads only into the placement it was saved from; elsewhere it
is refused (:func:`check_loadable`).
"""

import glob
import json
import os
import re
from contextlib import contextmanager

import torch

from deepspeed_dualpipe.checkpoint.files import CheckpointError

MAP_PATTERN = "dualpipe_moe_mp_rank_*.json"
_EXPERT = re.compile(r"\.deepspeed_experts\.(\d+)\.")


def _map_name(mp_rank: int) -> str:
    return f"dualpipe_moe_mp_rank_{mp_rank:02d}.json"


def _moe_layers(module):
    """``(name, layer)`` of every DeepSpeed MoE layer of ``module``, in DeepSpeed's order (its ``k``)."""
    from deepspeed.moe.layer import MoE
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]


def write_map(engine, directory: str) -> None:
    """This rank's map, by the rank that writes its ``mp_rank_XX`` file (data-parallel rank 0)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups
    if not engine.has_moe_layers or groups._get_data_parallel_rank() != 0:
        return
    keys = list(engine._get_non_moe_state_dict(DeepSpeedEngine.module_state_dict(engine)))
    content = {"moe_layers": [name for name, _ in _moe_layers(engine.module)], "module_keys": keys}
    with open(os.path.join(directory, _map_name(engine.checkpoint_mp_rank)), "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())


def read_maps(path: str) -> dict:
    """``{mp_rank: map}`` of a checkpoint directory (empty if it has none)."""
    maps = {}
    for file in glob.glob(os.path.join(path, MAP_PATTERN)):
        with open(file) as f:
            maps[int(re.search(r"mp_rank_(\d+)", os.path.basename(file))[1])] = json.load(f)
    return maps


def check_loadable(path: str, saved: str, mine: str) -> None:
    """Refuse an MoE checkpoint without maps in another placement (``saved``/``mine`` describe them)."""
    if not read_maps(path):
        raise CheckpointError(
            f"MoE checkpoint {path} was written by {saved}; this engine runs {mine}. DeepSpeed names its expert "
            f"files by pipeline rank and by the count of MoE layers on that rank, which only the placement that "
            f"wrote them can read, and this checkpoint has no deepspeed_dualpipe map of them ({MAP_PATTERN}: it was "
            f"saved by DeepSpeed's own save_checkpoint). Load it under the placement it was saved from and save it "
            f"again with deepspeed_dualpipe (engine.save_checkpoint of the plugin's engines, or "
            f"deepspeed_dualpipe.checkpoint.save_checkpoint(engine, ...) for DeepSpeed's own)")


def load_module(engine, path: str) -> None:
    """Load ``engine``'s parameters from the MoE checkpoint in ``path``, written under any placement."""
    from deepspeed.utils import groups
    maps = read_maps(path)
    wanted = engine.module.state_dict()
    state, sources = {}, {}
    for rank, saved in sorted(maps.items()):
        for key in saved["module_keys"]:
            sources.setdefault(key, rank)
    needed = {}
    for key in wanted:
        if not _EXPERT.search(key) and key in sources:
            needed.setdefault(sources[key], []).append(key)
    for rank, keys in sorted(needed.items()):
        module = engine.checkpoint_engine.load(os.path.join(path, f"mp_rank_{rank:02d}_model_states.pt"),
                                               map_location=torch.device("cpu"))["module"]
        state.update({key: module[key] for key in keys})
        del module
    where = {
        name: (rank, k)
        for rank, saved in sorted(maps.items(), reverse=True)
        for k, name in enumerate(saved["moe_layers"])
    }
    for name, layer in _moe_layers(engine.module):
        if name not in where:
            continue
        rank, k = where[name]
        first = groups._get_expert_parallel_rank(layer.expert_group_name) * layer.num_local_experts
        for local in range(layer.num_local_experts):
            file = os.path.join(path, f"layer_{k}_expert_{first + local}_mp_rank_{rank:02d}_model_states.pt")
            if not os.path.exists(file):
                raise CheckpointError(f"MoE checkpoint {path} has no file for expert {first + local} of layer {name} "
                                      f"(expected {os.path.basename(file)}): it was saved with fewer experts or is "
                                      f"incomplete")
            experts = engine.checkpoint_engine.load(file, map_location=torch.device("cpu"))
            state.update({
                _EXPERT.sub(f".deepspeed_experts.{local}.", key, count=1): value
                for key, value in experts.items()
            })
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise CheckpointError(f"MoE checkpoint {path} does not hold {len(missing)} parameter(s) of this model, e.g. "
                              f"{missing[:3]}: it was saved from another model")
    engine.module.load_state_dict(state, strict=True)


@contextmanager
def loading_across_placements(engine, path: str):
    """Within the block, DeepSpeed's ``load_checkpoint`` on ``engine`` takes its parameters from
    :func:`load_module` (its own MoE path reads only the placement that wrote the files)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine.__dict__["load_moe_state_dict"]
    DeepSpeedEngine.load_moe_state_dict = staticmethod(lambda *args, **kwargs: None)
    engine.load_module_state_dict = lambda *args, **kwargs: load_module(engine, path)
    try:
        yield
    finally:
        DeepSpeedEngine.load_moe_state_dict = original
        del engine.load_module_state_dict
