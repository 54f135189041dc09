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

:class:`InlineTape` has the same two methods but records nothing: a plain ``forward`` runs the
phases through it and gets one ordinary autograd graph.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, List, Optional

import torch

__all__ = ["Tape", "InlineTape", "Pending", "CommIsland", "ComputeIsland", "launch_all_to_all", "flatten_tensors"]


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
    """

    def __init__(self, result: torch.Tensor, work=None, name: str = "all_to_all", group=None):
        self.name = name
        self.group = group
        self.start = time.perf_counter()
        self.end: Optional[float] = None if work is not None else self.start
        self.wait_began: Optional[float] = None  # when wait() began blocking on the work
        self.clock = None
        self._result = result
        self._work = work
        self._signalled = [None]  # the completion callback's stamp; it holds no reference to the tensors

    @property
    def done(self) -> bool:
        return self.end is not None

    def watch_completion(self) -> None:
        """Have the backend stamp :attr:`completed` (a no-op once waited, and on CUDA, whose future
        completes when the work is queued: a ``CudaClock`` times it there)."""
        if self._work is not None and not self._result.is_cuda:
            _stamp_completion(self._work, self._signalled)

    @property
    def completed(self) -> Optional[float]:
        """When the all-to-all finished: the earlier of the completion callback and ``wait()``'s return
        (the callback runs once the process lets its thread in, which may be after the wait returned)."""
        times = [t for t in (self._signalled[0], self.end) if t is not None]
        return min(times) if times else None

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            work, self._work = self._work, None
            now = time.perf_counter if self.clock is None else self.clock.now
            self.wait_began = now()
            try:
                work.wait()
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
    return Pending(recv, work, name, group)


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
    __slots__ = ("name", "originals", "detached", "raw", "returned", "params")

    def __init__(self, name, originals, detached, raw, returned, params):
        self.name, self.originals, self.detached = name, originals, detached
        self.raw, self.returned, self.params = raw, returned, params


class CommIsland:
    __slots__ = ("name", "group", "input", "output")

    def __init__(self, name, group, input, output):
        self.name, self.group, self.input, self.output = name, group, input, output


class Tape:
    """The islands of one chunk's forward for one micro-batch, in forward order.

    ``inputs`` are the chunk's inputs (set by ``forward_steps``, else the first island's); the
    backward returns their gradients. A tape is consumed by one ``backward_steps``.
    """

    def __init__(self):
        self.islands: List[Any] = []
        self.inputs: Optional[tuple] = None
        self._known = {}  # id -> tensor: everything an island may take that carries a gradient

    def begin(self, inputs: Any) -> None:
        """Declare the chunk's inputs (tensor, or tuple of them)."""
        if self.inputs is None:
            self.inputs = tuple(flatten_tensors(inputs))
            for t in self.inputs:
                self._known[id(t)] = t

    def known(self) -> List[torch.Tensor]:
        """Tensors that can receive gradients: chunk inputs and islands' results."""
        return [t for t in self._known.values() if t.requires_grad]

    def consume(self):
        """Hand the islands and chunk inputs to the backward; the tape is empty afterwards."""
        if self.islands is None:
            raise RuntimeError("this tape was already consumed by a backward")
        islands, self.islands, self._known = self.islands, None, {}
        return islands, self.inputs or ()

    def _cut(self, t: torch.Tensor, island: str, originals: list, detached: list) -> torch.Tensor:
        if t.requires_grad and id(t) not in self._known:
            raise ValueError(f"tape island {island!r}: an input requires grad but was neither a chunk input nor "
                             f"returned by an earlier island of this tape; do that computation inside a "
                             f"tape.compute island (or pass it .detach()ed if no gradient may flow)")
        if not t.is_floating_point():  # token ids, routing slots, counts: no gradient, passed as they are
            return t
        # Marked even if ``t`` needs no grad, so that every island can split its backward (torch's
        # split helpers need an input that requires grad); such gradients are dropped.
        d = t.detach().requires_grad_(True)
        originals.append(t)
        detached.append(d)
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
        built on them can be differentiated without entering the island.
        """
        if not torch.is_grad_enabled():  # inference: nothing to record
            return fn(*inputs)
        name = name or getattr(fn, "__name__", type(fn).__name__)
        self.begin(inputs)
        originals, detached = [], []
        outputs = fn(*_map_tensors(inputs, lambda t: self._cut(t, name, originals, detached)))
        raw, returned = [], []

        def alias(o: torch.Tensor) -> torch.Tensor:
            if not o.requires_grad:
                return o
            a = o.view_as(o)
            raw.append(o)
            returned.append(a)
            self._known[id(a)] = a
            return a

        outputs = _map_tensors(outputs, alias)
        params = None if params is None else list(params)
        self.islands.append(ComputeIsland(name, originals, detached, raw, returned, params))
        return outputs

    def all_to_all(self, x: torch.Tensor, group, name: str = "all_to_all") -> Pending:
        """Launch the all-to-all of ``x`` over ``group`` (equal splits, async); read it with ``wait()``.

        Without a real group (``None`` or one rank) it is the identity and launches nothing, but it
        is still an island so the code path is the same.
        """
        if not torch.is_grad_enabled():
            return launch_all_to_all(x.detach(), group, name)
        self.begin(x)
        if x.requires_grad and id(x) not in self._known:
            raise ValueError(f"tape all-to-all {name!r}: its input requires grad but was not returned by an "
                             f"island of this tape")
        pending = launch_all_to_all(x.detach(), group, name)  # identity: the result is a fresh detached alias
        out = pending._result
        if x.requires_grad:
            out.requires_grad_(True)
            self._known[id(out)] = out
        self.islands.append(CommIsland(name, group, x, out))
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
