"""The protocol between phased layers and the engine: steps, and the drivers that run them.

A chunk's forward (and backward) for one micro-batch is a *generator of steps*: it computes,
launches an all-to-all, ``yield``\\ s the :class:`~deepspeed_dualpipe.runtime.autograd.tape.Pending`, and waits on
it only when resumed. A driver decides what runs while the all-to-all is in flight:

* :func:`run` waits at once (one micro-batch alone, e.g. a plain ``forward``);
* :func:`interleave` switches to a second generator, so one micro-batch's all-to-all hides under
  the other's compute -- DualPipe's overlapped forward/backward pair.

A layer opts in by defining ``forward_steps(self, tape, x)`` (a generator that returns what
``forward`` returns); every other layer is one compute island. The forward is recorded on a
:class:`~deepspeed_dualpipe.runtime.autograd.tape.Tape`; :func:`backward_steps` replays it in reverse, giving each
compute island's backward to :class:`~deepspeed_dualpipe.runtime.autograd.split_backward.SplitBackward` (input part
now, weight part deferred) and each all-to-all's backward to the all-to-all of its gradient.

Every rank must drive the same generators in the same way: collectives are matched by the order
in which they are issued, and the drivers are deterministic, so this holds when the engine is.
"""

from __future__ import annotations

import functools
from typing import Any, Generator, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.autograd.graph import GradientEdge

from deepspeed_dualpipe.runtime.autograd.clocks import clock_for
from deepspeed_dualpipe.runtime.autograd.split_backward import SplitBackward, module_supports_split
from deepspeed_dualpipe.runtime.autograd.tape import (InlineTape, Pending, Tape, CommIsland, RecomputedIsland,
                                                      launch_all_to_all, flatten_tensors)

__all__ = ["Tape", "InlineTape", "Pending", "DeferredWeights", "forward_steps", "backward_steps", "run", "interleave"]

Steps = Generator[Pending, None, Any]


def forward_steps(layers: Iterable[Any], inputs: Any, tape: Tape) -> Steps:
    """A chunk's forward as steps: ``x = layer(x)`` for each layer, like DeepSpeed's PipelineModule.

    Layers with ``forward_steps(tape, x)`` are delegated to; any other callable is one island.
    Returns the chunk's outputs.
    """
    tape.begin(inputs)
    x = inputs
    for layer in layers:
        phased = getattr(layer, "forward_steps", None)
        if phased is not None:
            x = yield from phased(tape, x)
        else:
            x = tape.compute(layer, x, params=_declared_params(layer), name=type(layer).__name__)
    return x


def _declared_params(layer: Any) -> Optional[list]:
    """The parameters a plain layer uses: a module's own, those of the modules a
    ``functools.partial`` binds (DeepSpeed's ``TiedLayerSpec(forward_fn=...)``), or a bound
    method's module. ``None`` (its island's backward then runs whole) for any other callable, which
    may close over parameters nobody declared, and for a module that opted out of split backward
    (``supports_split_backward = False``)."""
    modules = [layer]
    if isinstance(layer, functools.partial):
        modules = [a for a in (*layer.args, *layer.keywords.values()) if isinstance(a, torch.nn.Module)]
        if not modules:
            return None
    elif not isinstance(layer, torch.nn.Module):
        owner = getattr(layer, "__self__", None)
        if not isinstance(owner, torch.nn.Module):
            return None
        modules = [owner]
    if not module_supports_split(modules):
        return None
    return [p for m in modules for p in m.parameters()]


class DeferredWeights:
    """The weight parts of one micro-batch's backward, run later in one go."""

    def __init__(self, handles: List[SplitBackward]):
        self._handles = handles
        self.split = any(h.split for h in handles)  # False: every weight gradient is in already

    def weight_part(self) -> None:
        """Accumulate every island's weight gradients (reverse island order, as autograd would)."""
        handles, self._handles = self._handles, None
        if handles is None:
            raise RuntimeError("DeferredWeights.weight_part() was already called for this micro-batch")
        for h in handles:
            h.weight_part()


def _add(grads: dict, key: Optional[int], g: Optional[torch.Tensor]) -> None:
    if key is not None and g is not None:
        old = grads.get(key)
        grads[key] = g if old is None else old + g


def _roots(obj: Any) -> list:
    """The tensors and ``GradientEdge``\\ s of ``obj`` (nested tuples/lists), in order."""
    if isinstance(obj, (torch.Tensor, GradientEdge)):  # (a GradientEdge is a tuple)
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [r for item in obj for r in _roots(item)]
    return []


def _root_grads(tape: Tape, roots: Any, root_grads: Any) -> dict:
    """Gradients of the roots w.r.t. every value an island returned (without entering islands), by key."""
    outs = _roots(roots)
    grads_in = [None] * len(outs) if root_grads is None else flatten_tensors(root_grads)
    if len(grads_in) != len(outs):
        raise ValueError(f"backward_steps: {len(outs)} roots but {len(grads_in)} root grads")
    pairs = [(o, g) for o, g in zip(outs, grads_in)
             if (isinstance(o, GradientEdge) or o.requires_grad) and (g is not None or root_grads is None)]
    targets = tape.targets()
    if not pairs or not targets:
        return {}
    found = torch.autograd.grad([o for o, _ in pairs], [edge for _, edge in targets], [g for _, g in pairs],
                                allow_unused=True)
    grads: dict = {}
    for (key, _), g in zip(targets, found):
        _add(grads, key, g)
    return grads


def backward_steps(tape: Tape, roots: Any, root_grads: Any = None, split: bool = True) -> Steps:
    """A chunk's backward as steps, islands in reverse. Returns ``(input_grads, weights)``.

    ``roots``: the chunk outputs (or their ``GradientEdge``\\ s) with their received gradients as
    ``root_grads``, or a scalar loss computed from them with ``root_grads=None``. ``input_grads`` is aligned with ``tape.inputs``
    (``None`` where an input is not floating point or does not require grad); ``weights`` is a
    :class:`DeferredWeights` (``weights.split`` False: nothing was deferred). Each island is
    dropped once its input part has run, and a gradient once it has been handed on: a pending
    weight part keeps only what its weight gradients read.
    """
    if tape.islands is None:
        raise RuntimeError("backward_steps: this tape was already consumed by a backward")
    grads = _root_grads(tape, roots, root_grads)
    roots = root_grads = None
    islands, inputs = tape.consume()
    handles = []
    while islands:
        island = islands.pop()
        if isinstance(island, CommIsland):
            if island.input_key is None:
                continue
            # Launched even without a gradient (zeros): the peers are waiting for this collective.
            g = grads.pop(island.output_key, None)
            g = torch.zeros(island.shape, dtype=island.dtype, device=island.device) if g is None else g
            pending = launch_all_to_all(g, island.group, island.name + ".grad")
            del g
            yield pending
            _add(grads, island.input_key, pending.wait())
            del pending
            continue
        outputs = [(where, grads.pop(key, None)) for key, where in island.outputs]
        outputs = [(where, g) for where, g in outputs if g is not None]
        if not outputs:
            continue  # nothing downstream needed this island
        if isinstance(island, RecomputedIsland):
            rerun = flatten_tensors(island.rerun())
            outputs = [(rerun[at], g) for at, g in outputs if rerun[at].requires_grad]
            leaves = island.leaves
        else:
            leaves = [leaf() for leaf in island.leaves]
        whole = island.params is None  # undeclared parameters: only a full backward reaches them
        handle = SplitBackward.input_part([root for root, _ in outputs], [g for _, g in outputs],
                                          leaves,
                                          island.params or (),
                                          split=split and not whole,
                                          set_input_grads=False)
        del outputs, leaves
        rerun = None  # a recomputed island's outputs: what its weight part needs is in the handle
        for key, g in zip(island.input_keys, handle.take_input_grads()):
            _add(grads, key, g)
        handles.append(handle)
    input_grads = tuple(grads.get(key) if wanted else None for key, wanted in inputs)
    return input_grads, DeferredWeights(handles)


def _check(step: Any) -> Pending:
    if not isinstance(step, Pending):
        raise TypeError(f"a phased generator may only yield Pending all-to-alls, got {type(step).__name__}")
    return step


class _Driver:
    """Advances one generator step by step and, if asked, records phases on ``clock``
    (:mod:`.clocks`): compute steps without the time they blocked in ``wait()``, and each all-to-all
    from its launch to when it completed."""

    def __init__(self, gen: Steps, label: str, records: Optional[list], clock=None):
        self.gen, self.label, self.records, self.clock = gen, label, records, clock
        self.pending: Optional[Pending] = None
        self.finished, self.result = False, None

    def step(self) -> None:
        waited = self.pending if self.pending is not None and not self.pending.done else None
        start = self.clock.now() if self.records is not None else None
        try:
            nxt = _check(self.gen.send(None))
        except StopIteration as stop:
            nxt, self.finished, self.result = None, True, stop.value
        if self.records is not None:
            self._computed(start, self.clock.now(), waited)
            if nxt is not None:
                self.clock.watch(nxt)
        self._settle(self.pending)
        self.pending = nxt
        if self.finished:
            self._settle(nxt)

    def _computed(self, start, stop, waited: Optional[Pending]) -> None:
        label = f"{self.label}:compute"
        if waited is not None and waited.done and waited.wait_began is not None:  # it blocked in this step
            self.records += [(label, start, waited.wait_began), (label, waited.end, stop)]
        else:
            self.records.append((label, start, stop))

    def _settle(self, pending: Optional[Pending]) -> None:
        if pending is None:
            return
        pending.wait()  # a no-op when the layer has waited already (it always should have)
        if self.records is not None:
            self.records.append(
                (f"{self.label}:{pending.name}", self.clock.launch(pending), self.clock.completion(pending)))


def _recorded(events: Optional[list], device, clock=None):
    """``(records, clock)``: where the drivers record and with what clock (nothing without ``events``)."""
    return ([], clock or clock_for(device)) if events is not None else (None, None)


def _flush(events: Optional[list], records: Optional[list], clock, given=None) -> None:
    """Hand the records on: resolved into seconds now, or, on a ``given`` clock (a recorded step's), as they
    are, for its owner to resolve once at the end of the step (no synchronisation per instruction)."""
    if events is not None:
        events.extend(records if given is not None else clock.resolve(records))


def run(gen: Steps, events: Optional[list] = None, label: str = "run", device=None, clock=None) -> Any:
    """Drive ``gen`` alone: every all-to-all is waited as soon as it is launched. Returns its result.

    ``events``/``device``/``clock``: as for :func:`interleave`."""
    records, clock, given = *_recorded(events, device, clock), clock
    driver = _Driver(gen, label, records, clock)
    while not driver.finished:
        driver.step()
        if driver.pending is not None:
            driver.pending.wait()
    _flush(events, records, clock, given)
    return driver.result


def interleave(first: Steps,
               second: Steps,
               events: Optional[list] = None,
               labels: Sequence[str] = ("first", "second"),
               device=None,
               clock=None) -> Tuple[Any, Any]:
    """Drive two generators alternately; each runs until it launches an all-to-all, then the other.

    ``first`` starts. For a DualPipe pair pass the backward first, as Megatron-core orders it: its
    first step (the last island's backward) launches the combine's gradient all-to-all, which then
    hides under the forward's first compute.

    Returns both results. With ``events=[]``, every compute step (``"<label>:compute"``, without the
    time it blocked waiting for its own all-to-all) and every all-to-all (``"<label>:<name>"``, from
    its launch to when it actually completed) is appended as ``(label, start, end)`` in
    ``time.perf_counter`` seconds; on a CUDA ``device`` they are timed with CUDA events
    (:mod:`.clocks`). :mod:`deepspeed_dualpipe.runtime.overlap` reads what overlapped. A ``clock`` given (a
    recorded step's, :mod:`deepspeed_dualpipe.runtime.profile`) records on it and leaves its stamps unresolved.
    """
    records, clock, given = *_recorded(events, device, clock), clock
    drivers = [_Driver(first, labels[0], records, clock), _Driver(second, labels[1], records, clock)]
    while not all(d.finished for d in drivers):
        for d in drivers:
            if not d.finished:
                d.step()
    _flush(events, records, clock, given)
    return drivers[0].result, drivers[1].result
