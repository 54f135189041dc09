"""A chunk's forward for one micro-batch, recorded as islands (see :mod:`deepspeed_dualpipe.runtime.autograd.steps`).

Why islands: to overlap one micro-batch's all-to-all with another micro-batch's compute, and to
split each backward into an input part (now) and a weight part (later), the backward must be
runnable one piece at a time. Each compute island therefore runs on *detached* inputs and owns
its own small autograd graph; each communication island is an all-to-all whose backward is the
all-to-all of the gradient. :func:`~deepspeed_dualpipe.runtime.autograd.steps.backward_steps` walks the islands
in reverse and carries gradients across the cuts by hand.

Rules a phased layer follows:

* every tensor that requires grad and is handed to an island is either a chunk input or was
  returned by an earlier island of the same tape (computation between islands would be cut off
  from the backward, so it raises);
* an all-to-all's result is read only through ``pending.wait()``.

The tape keeps no tensor alive (see :class:`Tape`): an all-to-all's buffers and an island's outputs
live as long as their consumers (or the islands' saved tensors) need them, as in one autograd graph.

:class:`InlineTape` has the same two methods but records nothing: a plain ``forward`` runs the
phases through it and gets one ordinary autograd graph.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Iterable, List, Optional

import torch
from torch.autograd.graph import get_gradient_edge

from deepspeed_dualpipe.runtime.autograd import saved

__all__ = [
    "Tape", "InlineTape", "Pending", "CommIsland", "ComputeIsland", "RecomputedIsland", "launch_all_to_all",
    "flatten_tensors"
]


def flatten_tensors(obj: Any) -> List[torch.Tensor]:
    """The tensors of ``obj`` (a tensor, or nested tuples/lists of them), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flatten_tensors(item)]
    return []


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(item, fn) for item in obj)
    return obj


def _comm():
    from deepspeed import comm as dist  # deferred: importing DeepSpeed's runtime is slow
    return dist


def moves_data(group) -> bool:
    """True if an all-to-all over ``group`` moves data. ``None`` means "no expert parallelism"
    here (DeepSpeed's ``pg_utils.is_parallel`` convention), never the world group."""
    return group is not None and _comm().get_world_size(group=group) > 1


class Pending:
    """An all-to-all in flight. ``wait()`` returns its result (and may be called again).

    Times (``time.perf_counter`` seconds): ``start`` when it was launched, ``end`` when ``wait()``
    returned, and, once :meth:`watch_completion` was called (the step drivers do when they record),
    :attr:`completed`: when it actually finished, whoever waited for it and when, stamped by the
    backend's completion callback on the work's future (gloo runs the collective on its own thread).
    A :mod:`~deepspeed_dualpipe.runtime.autograd.clocks` clock set as ``clock`` (the drivers do, when
    they record on CUDA) times it on the device instead.

    It keeps the collective's work handle and its send buffer until it is dropped itself, not only
    until ``wait()``: the backend's own thread lets go of them as the collective ends, and whoever
    lets go last frees the buffer, on its thread. Dropped later by this thread, they are freed here,
    where a memory profiler of this thread sees it."""

    def __init__(self, result: torch.Tensor, work=None, name: str = "all_to_all", group=None, send=None):
        self.name = name
        self.group = group
        self.start = time.perf_counter()
        self.end: Optional[float] = None if work is not None else self.start
        self.wait_began: Optional[float] = None  # when wait() began blocking on the work
        self.clock = None
        self._result = result
        self._work = work
        self._signalled = [None]  # the completion callback's stamp; it holds no reference to the tensors
        self._waited = work is None
        self._send = send

    @property
    def done(self) -> bool:
        return self.end is not None

    def watch_completion(self) -> None:
        """Have the backend stamp :attr:`completed` (a no-op once waited, and on CUDA, whose future
        completes when the work is queued: a ``CudaClock`` times it there)."""
        if not self._waited and not self._result.is_cuda:
            _stamp_completion(self._work, self._signalled)

    @property
    def completed(self) -> Optional[float]:
        """When the all-to-all finished: the earlier of the completion callback and ``wait()``'s return
        (the callback runs once the process lets its thread in, which may be after the wait returned)."""
        times = [t for t in (self._signalled[0], self.end) if t is not None]
        return min(times) if times else None

    def wait(self) -> torch.Tensor:
        if not self._waited:
            self._waited = True
            now = time.perf_counter if self.clock is None else self.clock.now
            self.wait_began = now()
            try:
                self._work.wait()
            except Exception as exc:  # name the collective: a bare gloo error does not
                raise RuntimeError(f"all-to-all {self.name!r} over ranks {self._ranks()} failed on rank "
                                   f"{self._rank()}: {exc}") from exc
            self.end = now()
        return self._result

    # Best effort only: these run while reporting a failure, which may be the group itself.
    def _ranks(self):
        try:
            return torch.distributed.get_process_group_ranks(self.group)
        except Exception:
            return "?"

    @staticmethod
    def _rank():
        try:
            return torch.distributed.get_rank()
        except Exception:
            return "?"

    def __repr__(self) -> str:
        return f"Pending({self.name!r}, {'done' if self.done else 'in flight'})"


def _stamp_completion(work, stamp: list) -> None:
    """Stamp ``stamp[0]`` when ``work`` completes, from the backend's callback on its future."""
    try:
        future = work.get_future()
    except (AttributeError, RuntimeError):  # a backend without futures: only wait() tells
        return

    def completed(_):
        if stamp[0] is None:
            stamp[0] = time.perf_counter()

    future.add_done_callback(completed)


def launch_all_to_all(x: torch.Tensor, group, name: str) -> Pending:
    """Start an equal-split all-to-all of ``x`` (no autograd); identity without a real group."""
    if not moves_data(group):
        return Pending(x, None, name, group)
    send = x.contiguous()
    recv = torch.empty_like(send)
    work = _comm().all_to_all_single(recv, send, group=group, async_op=True)
    return Pending(recv, work, name, group, send=send)


class _AllToAll(torch.autograd.Function):
    """Synchronous all-to-all inside one autograd graph (the :class:`InlineTape` path)."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        return launch_all_to_all(x, group, "all_to_all").wait()

    @staticmethod
    def backward(ctx, grad):
        return None, _AllToAll.apply(ctx.group, grad)


class ComputeIsland:
    """A compute island as the backward needs it: gradients leave through ``outputs`` (``(key, edge)``: the
    ``GradientEdge`` of each returned alias, not the tensor) and arrive at its detached input ``leaves``
    (weak references: the island's graph keeps those it uses), each routed to the value ``input_keys``
    names (``None``: the gradient is dropped)."""

    __slots__ = ("name", "input_keys", "leaves", "outputs", "params")

    def __init__(self, name, input_keys, leaves, outputs, params):
        self.name, self.input_keys, self.leaves = name, input_keys, leaves
        self.outputs, self.params = outputs, params


class RecomputedIsland:
    """A compute island whose forward runs again in the backward (``dualpipe.recompute_islands``): it keeps
    its function, its (detached) inputs and the random-number state it began with, and nothing of what
    its forward computed. ``outputs`` are ``(key, position)``: each gradient-carrying output's place in
    the island's flattened outputs."""

    __slots__ = ("name", "fn", "inputs", "input_keys", "leaves", "outputs", "params", "rng", "release")

    def __init__(self, name, fn, inputs, input_keys, leaves, outputs, params, rng, release=None):
        self.name, self.fn, self.inputs, self.input_keys, self.leaves = name, fn, inputs, input_keys, leaves
        self.outputs, self.params, self.rng, self.release = outputs, params, rng, release

    def rerun(self):
        """The island's forward again, on the same inputs and random numbers, recorded for its backward."""
        cpu, cuda = self.rng
        with torch.random.fork_rng(devices=list(cuda)):
            torch.set_rng_state(cpu)
            for device, state in cuda.items():
                torch.cuda.set_rng_state(state, device)
            if self.release is None:
                with torch.enable_grad(), saved.releasable():
                    return self.fn(*self.inputs)
            with torch.enable_grad(), self.release.recording(self.name):
                outputs = self.fn(*self.inputs)
            self.release.learn(self.name, outputs)
            return outputs


def _rng_state(tensors) -> tuple:
    devices = sorted({t.device.index for t in tensors if t.is_cuda})
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}


class CommIsland:
    """An all-to-all as its backward needs it: the keys of its input and output values and the output's
    shape, dtype and device (for a zero gradient), never the tensors."""

    __slots__ = ("name", "group", "input_key", "output_key", "shape", "dtype", "device")

    def __init__(self, name, group, input_key, output_key, like: torch.Tensor):
        self.name, self.group, self.input_key, self.output_key = name, group, input_key, output_key
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device


class Tape:
    """The islands of one chunk's forward for one micro-batch, in forward order.

    ``inputs`` are the chunk's inputs (set by ``forward_steps``, else the first island's); the
    backward returns their gradients. A tape is consumed by one ``backward_steps``.

    The tape holds no tensor of the forward: every value that can carry a gradient across a cut (a
    chunk input, an island's returned alias, an all-to-all's result) gets a key, and the tape keeps
    only a weak reference to it (to recognise it when an island takes it) and, for the backward,
    the ``GradientEdge`` where its gradient enters the graph. What stays alive is what the islands'
    graphs saved, as in one autograd graph.
    """

    def __init__(self, recompute: Iterable[str] = (), release: Optional[saved.Policy] = None):
        self.recompute = frozenset(recompute)  # names of the compute islands to recompute in the backward
        self.release = release  # which islands record their saves as releasable (None: all)
        self.islands: List[Any] = []
        self.inputs: Optional[tuple] = None  # (key or None, float and requires grad) per chunk input
        self._known = {}  # id -> (weak reference, key): values an island may take that carry a gradient
        self._targets = []  # (key, edge or weak reference to a leaf): where those values' gradients enter
        self._next_key = 0

    def _remember(self, t: torch.Tensor) -> int:
        key, self._next_key = self._next_key, self._next_key + 1
        ref = weakref.ref(t)
        self._known[id(t)] = (ref, key)
        # A leaf's edge is its AccumulateGrad node, which would hold the tensor: keep a weak reference
        # and make the edge only if the leaf is still alive when the backward starts.
        self._targets.append((key, ref if t.grad_fn is None else get_gradient_edge(t)))
        return key

    def _recording(self, name: str):
        return saved.releasable() if self.release is None else self.release.recording(name)

    def _key(self, t: torch.Tensor) -> Optional[int]:
        entry = self._known.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def begin(self, inputs: Any) -> None:
        """Declare the chunk's inputs (tensor, or tuple of them)."""
        if self.inputs is None:
            self.inputs = tuple(
                (self._remember(t) if t.requires_grad else None, t.is_floating_point() and t.requires_grad)
                for t in flatten_tensors(inputs))

    def targets(self) -> List[tuple]:
        """``(key, edge)`` of every value that can still receive a gradient: chunk inputs and islands' results
        (a leaf that nothing holds any more cannot)."""
        out = []
        for key, where in self._targets:
            if isinstance(where, weakref.ref):
                where = where()
                if where is None:
                    continue
                where = get_gradient_edge(where)
            out.append((key, where))
        return out

    def consume(self):
        """Hand the islands and chunk inputs to the backward; the tape is empty afterwards."""
        if self.islands is None:
            raise RuntimeError("this tape was already consumed by a backward")
        islands, self.islands, self._known, self._targets = self.islands, None, {}, []
        return islands, self.inputs or ()

    def _cut(self, t: torch.Tensor, island: str, keys: list, leaves: list) -> torch.Tensor:
        key = self._key(t) if t.requires_grad else None
        if t.requires_grad and key is None:
            raise ValueError(f"tape island {island!r}: an input requires grad but was neither a chunk input nor "
                             f"returned by an earlier island of this tape; do that computation inside a "
                             f"tape.compute island (or pass it .detach()ed if no gradient may flow)")
        if not t.is_floating_point():  # token ids, routing slots, counts: no gradient, passed as they are
            return t
        # Marked even if ``t`` needs no grad, so that every island can split its backward (the split needs
        # an input that requires grad); such gradients are dropped (key None).
        d = t.detach().requires_grad_(True)
        keys.append(key)
        leaves.append(weakref.ref(d))
        return d

    def compute(self,
                fn: Callable,
                *inputs: Any,
                params: Optional[Iterable[torch.nn.Parameter]] = None,
                name: Optional[str] = None) -> Any:
        """Run ``fn(*inputs)`` on detached inputs as one island; return its outputs.

        ``params``: every parameter ``fn`` uses (``()`` if none); their gradients are deferred to
        the weight part. ``None`` means "not declared": that island's backward then runs whole
        (input and weight gradients at once), which reaches whatever parameters ``fn`` used.
        Returned tensors that require grad are fresh aliases of the island's outputs, so a loss
        built on them can be differentiated without entering the island. The forward runs under
        :func:`~deepspeed_dualpipe.runtime.autograd.saved.releasable`, so the input part can release what
        only the input gradients read.
        """
        if not torch.is_grad_enabled():  # inference: nothing to record
            return fn(*inputs)
        name = name or getattr(fn, "__name__", type(fn).__name__)
        self.begin(inputs)
        keys, leaves = [], []
        cut = _map_tensors(inputs, lambda t: self._cut(t, name, keys, leaves))
        params = None if params is None else list(params)
        if name in self.recompute:
            return self._checkpointed(fn, cut, name, keys, leaves, params)
        with self._recording(name):
            outputs = fn(*cut)
        if self.release is not None:
            self.release.learn(name, outputs)
        del cut
        returned = []

        def alias(o: torch.Tensor) -> torch.Tensor:
            if not o.requires_grad:
                return o
            a = o.view_as(o)
            returned.append((self._remember(a), get_gradient_edge(a)))
            return a

        outputs = _map_tensors(outputs, alias)
        self.islands.append(ComputeIsland(name, keys, leaves, returned, params))
        return outputs

    def _checkpointed(self, fn, cut, name, keys, leaves, params):
        """Run the island without recording a graph; keep only what its forward needs to run again."""
        rng = _rng_state(flatten_tensors(cut))
        with torch.no_grad():
            outputs = fn(*cut)
        returned, position = [], [0]

        def alias(o: torch.Tensor) -> torch.Tensor:
            at, position[0] = position[0], position[0] + 1
            if not o.is_floating_point():
                return o
            # Without a graph it is unknown which outputs a gradient will reach: every floating-point one
            # may; the rerun's outputs tell (one that needs no gradient gets none).
            a = o.detach().requires_grad_(True)
            returned.append((self._remember(a), at))
            return a

        outputs = _map_tensors(outputs, alias)
        self.islands.append(
            RecomputedIsland(name, fn, cut, keys, [leaf() for leaf in leaves], returned, params, rng, self.release))
        return outputs

    def all_to_all(self, x: torch.Tensor, group, name: str = "all_to_all") -> Pending:
        """Launch the all-to-all of ``x`` over ``group`` (equal splits, async); read it with ``wait()``.

        Without a real group (``None`` or one rank) it is the identity and launches nothing, but it
        is still an island so the code path is the same.
        """
        if not torch.is_grad_enabled():
            return launch_all_to_all(x.detach(), group, name)
        self.begin(x)
        in_key = self._key(x) if x.requires_grad else None
        if x.requires_grad and in_key is None:
            raise ValueError(f"tape all-to-all {name!r}: its input requires grad but was not returned by an "
                             f"island of this tape")
        pending = launch_all_to_all(x.detach(), group, name)  # identity: the result is a fresh detached alias
        out = pending._result
        out_key = None
        if x.requires_grad:
            out.requires_grad_(True)
            out_key = self._remember(out)
        self.islands.append(CommIsland(name, group, in_key, out_key, out))
        return pending


class InlineTape:
    """Runs phases straight through, building one autograd graph (a plain ``forward``)."""

    inputs = None

    def begin(self, inputs: Any) -> None:
        pass

    def compute(self, fn: Callable, *inputs: Any, params=None, name: Optional[str] = None) -> Any:
        return fn(*inputs)

    def all_to_all(self, x: torch.Tensor, group, name: str = "all_to_all") -> Pending:
        out = _AllToAll.apply(group, x) if moves_data(group) else x.contiguous()
        return Pending(out, None, name, group)
