"""A probe for the Megatron-DeepSpeed tests (on PYTHONPATH of the job's ranks): counts the forward and backward
calls of Megatron's linear autograd Function, and writes them per rank to $DUALPIPE_PROBE_DIR at exit. With
$A2A_PROBE_OUT set, it also installs tests/helpers/a2a_probe (only one sitecustomize runs); with $GRAD_PROBE_OUT,
this directory's grad_probe. It also emulates NCCL's acceptance of a flat all-gather output on gloo
(:func:`_flat_all_gather`)."""

import atexit
import importlib.abc
import importlib.util
import json
import os
import sys

CALLS = {"forward": 0, "backward": 0}
WRAPPED = []  # set once the Function is wrapped: only the job's ranks import it (not the launcher)


def _count(function):
    forward, backward = function.forward, function.backward

    def counted_forward(*args, **kwargs):
        CALLS["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        CALLS["backward"] += 1
        return backward(*args, **kwargs)

    function.forward, function.backward = staticmethod(counted_forward), staticmethod(counted_backward)


def _count_linear(module):
    _count(module.LinearWithGradAccumulationAndAsyncCommunication)
    WRAPPED.append(True)


def _flat_all_gather(module):
    """A harness emulation of NCCL, not a fix: DeepSpeed MoE's ``_gather_tokens`` (with tensor parallelism) hands
    ``all_gather_into_tensor`` a flat output buffer of world x input elements. NCCL checks only the element count;
    gloo wants the output shaped as the inputs concatenated along dim 0 and refuses ("invalid tensor size"). Here
    such a flat buffer is passed as a view of that shape, the same memory layout, so gloo fills it as NCCL would."""
    import deepspeed.comm as ds_comm
    gather = ds_comm.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor, tensor, *args, **kwargs):
        if output_tensor.dim() == 1 and tensor.dim() > 1 and output_tensor.numel() % tensor.numel() == 0:
            world = output_tensor.numel() // tensor.numel()
            output_tensor = output_tensor.view(world * tensor.shape[0], *tensor.shape[1:])
        return gather(output_tensor, tensor, *args, **kwargs)

    ds_comm.all_gather_into_tensor = all_gather_into_tensor


def _grad_probe(cls_name):

    def hook(module):
        if os.environ.get("GRAD_PROBE_OUT") and "LOCAL_RANK" in os.environ:
            import grad_probe
            grad_probe.install(getattr(module, cls_name))

    return hook


# What to do once each module is imported (only the job's ranks import them, not the launcher).
HOOKS = {
    "megatron.core.tensor_parallel.layers": _count_linear,
    "deepspeed.moe.mappings": _flat_all_gather,
    "deepspeed.runtime.engine": _grad_probe("DeepSpeedEngine"),
    "deepspeed_dualpipe.runtime.gradients": _grad_probe("GradientReductions"),
}


class _Finder(importlib.abc.MetaPathFinder):
    """Runs a module's hook once it is imported."""

    def find_spec(self, name, path, target=None):
        if name not in HOOKS or HOOKS[name] is None:
            return None
        hook, HOOKS[name] = HOOKS[name], None
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            hook(module)

        spec.loader.exec_module = exec_module
        return spec


def _write():
    directory = os.environ.get("DUALPIPE_PROBE_DIR")
    if directory and WRAPPED:
        with open(os.path.join(directory, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(CALLS, f)


sys.meta_path.insert(0, _Finder())
atexit.register(_write)

if os.environ.get("A2A_PROBE_OUT") and "LOCAL_RANK" in os.environ:
    import a2a_probe
    a2a_probe.install(os.environ["A2A_PROBE_OUT"], sync=os.environ.get("A2A_PROBE_PLANT") == "sync")
