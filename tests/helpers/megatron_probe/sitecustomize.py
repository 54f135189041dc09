"""A probe for the Megatron-DeepSpeed tests (on PYTHONPATH of the job's ranks): counts the forward and backward
calls of Megatron's linear autograd Function, and writes them per rank to $DUALPIPE_PROBE_DIR at exit. With
$A2A_PROBE_OUT set, it also installs tests/helpers/a2a_probe (only one sitecustomize runs)."""

import atexit
import importlib.abc
import importlib.util
import json
import os
import sys

TARGET = "megatron.core.tensor_parallel.layers"
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


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the Function once its module is imported."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _count(module.LinearWithGradAccumulationAndAsyncCommunication)
            WRAPPED.append(True)

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
