"""Split one micro-batch's backward into "I" (input grads) and "W" (weight grads).

ZeroBubble-style schedules such as DualPipe run a stage's backward in two parts:

* **I** -- :meth:`SplitBackward.input_part` computes the gradients w.r.t. the
  stage's input tensors so they can be sent upstream at once;
* **W** -- :meth:`SplitBackward.weight_part`, called later (FIFO across
  micro-batches), accumulates into ``param.grad`` exactly like a normal
  ``backward()`` would, then frees the saved graph state.

How (the approach of torch.distributed.pipelining's ``stage_backward_input`` /
``stage_backward_weight``, written here with public autograd APIs only): the
graph between the outputs and the inputs is walked once. Each parameter's
gradient path joins the input path at *intermediate* nodes; the input pass runs
``torch.autograd.grad`` to the inputs (keeping the graph) and records, with a
pre-hook, the gradient flowing into each intermediate. The weight pass later
runs ``torch.autograd.grad`` from those intermediates to the parameters.

What the weight pass keeps, and nothing more (what autograd alone would keep
for it): the gradients flowing into the intermediates (a linear layer's output
gradient) and the tensors saved by the nodes the weight pass runs (a linear
layer's input). A forward recorded under :func:`.saved.releasable` lets the
input pass empty the saved tensors of every other node it ran (a sigmoid's
output, attention's probabilities, ...); without it they stay until the weight
pass frees the graph. The outputs may be given as ``GradientEdge``\\ s
(``torch.autograd.graph.get_gradient_edge``), so a caller need not keep the
output tensors alive for the backward.

* Parameters are only reached through graph nodes that depend on a stage input
  requiring grad. If no input requires grad (e.g. integer token ids on the
  first stage) or an output does not depend on any such input, the weight
  gradients would be silently dropped, so the full backward is used.
* Parameter groups whose weight passes would run a common node are merged, so
  that one group's weight pass cannot free what another still needs.

Fallback: when the graph is unsupported or the caller passes ``split=False``,
:meth:`SplitBackward.input_part` runs the full backward (input *and* weight
grads) and :meth:`SplitBackward.weight_part` is a no-op, so the numbers stay right.

Custom autograd Functions (apex's fused RMSNorm, a Megatron linear, DeepSpeed's
reentrant activation checkpoint): a split would run such a Function's whole
backward in both parts, so each runs once, in the input part. One that holds
parameters (a fused kernel: a parameter is among its inputs) computes their
gradients there, while the rest of the graph is still split and its weight
gradients deferred; a graph holding one that holds none (its parameters, if
any, are out of the graph's sight) is not split at all. Either way a Function
can defer its own weight gradient to the weight part through
:mod:`.weight_store`. A Function class that sets ``dualpipe_split_safe = True``
(pure and cheap) is split like built-in ops.

Opting out: a custom layer whose backward must not be split (e.g. it relies on
backward hooks or a custom ``autograd.Function`` with side effects) sets the
class attribute ``supports_split_backward = False``. The engine computes
``split = module_supports_split(stage_module)`` once and passes it to
:meth:`SplitBackward.input_part`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from deepspeed_dualpipe.runtime.autograd import saved, weight_store

TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]
Roots = Union[torch.Tensor, GradientEdge, Sequence[Union[torch.Tensor, GradientEdge]]]


def split_available() -> bool:
    """True if this torch has the autograd APIs the split backward uses (``GradientEdge``)."""
    graph = torch.autograd.graph
    return hasattr(graph, "GradientEdge") and hasattr(graph, "get_gradient_edge") and hasattr(
        torch._C, "_current_autograd_node")


def module_supports_split(module: Union[nn.Module, Iterable[nn.Module]]) -> bool:
    """False if ``module`` (or any of its submodules) sets ``supports_split_backward = False``.

    Accepts a single module or an iterable of modules (e.g. a stage's layers).
    """
    modules = [module] if isinstance(module, nn.Module) else list(module)
    for top in modules:
        for m in top.modules():
            if getattr(m, "supports_split_backward", True) is False:
                return False
    return True


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (torch.Tensor, GradientEdge)):
        return [x]
    return list(x)


def _outputs_and_grads(outputs: Roots, output_grads: Optional[TensorOrTensors]):
    """Keep the outputs that take part in autograd (every ``GradientEdge`` does), with their matching grads."""
    outs = _as_list(outputs)
    grads = None if output_grads is None else _as_list(output_grads)
    if grads is not None and len(grads) != len(outs):
        raise ValueError(f"got {len(outs)} outputs but {len(grads)} output grads")
    keep_o, keep_g = [], []
    for i, o in enumerate(outs):
        if isinstance(o, torch.Tensor) and not o.requires_grad:
            continue
        if not isinstance(o, (torch.Tensor, GradientEdge)):
            continue
        g = None if grads is None else grads[i]
        if grads is not None and g is None:
            continue  # no gradient flows into this output
        keep_o.append(o)
        keep_g.append(g)
    return keep_o, (None if grads is None else keep_g)


def full_backward(outputs: Roots, output_grads: Optional[TensorOrTensors] = None) -> None:
    """Plain ``torch.autograd.backward`` (tensors that need no grad are skipped)."""
    outs, grads = _outputs_and_grads(outputs, output_grads)
    if outs:
        torch.autograd.backward(outs, grad_tensors=grads)


def _edge(t) -> GradientEdge:
    """Where the gradient of ``t`` enters the graph: its grad_fn, or its AccumulateGrad for a leaf."""
    return t if isinstance(t, GradientEdge) else get_gradient_edge(t)


def _depends_on(root, targets: set) -> bool:
    """True if any node in ``targets`` is reachable from ``root`` in the backward graph."""
    seen, todo = {root}, deque([root])
    while todo:
        node = todo.popleft()
        if node in targets:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def _reverse_graph(roots: list) -> Dict[Any, list]:
    """node -> the nodes that feed gradients into it, for every node reachable from ``roots``."""
    parents: Dict[Any, list] = defaultdict(list)
    seen, todo = set(roots), deque(roots)
    while todo:
        node = todo.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            parents[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return parents


def _closure(starts, parents, stop: set) -> Tuple[set, set]:
    """Nodes reached from ``starts`` against the gradient flow, not entering ``stop``; and the ``stop``
    nodes met on the way."""
    closure, met = set(starts), set()
    todo = deque(starts)
    while todo:
        for parent in parents.get(todo.popleft(), ()):
            if parent in closure:
                continue
            if parent in stop:
                met.add(parent)
                continue
            closure.add(parent)
            todo.append(parent)
    return closure, met


def _between(starts, parents, within: set) -> set:
    """Nodes of ``within`` that lie on a gradient path from one of ``starts`` to another."""
    down, todo = set(starts), deque(starts)
    while todo:
        for nxt, _ in todo.popleft().next_functions:
            if nxt is not None and nxt in within and nxt not in down:
                down.add(nxt)
                todo.append(nxt)
    up, _ = _closure(starts, {n: [p for p in ps if p in within] for n, ps in parents.items()}, set())
    return down & up


class _Group:
    """Parameters whose weight gradients start from the same intermediates: ``nodes`` is every node
    their weight pass runs (what it may not lose), ``grads`` the gradients that flowed into the
    intermediates during the input pass."""

    __slots__ = ("params", "intermediates", "nodes", "grads")

    def __init__(self, params, intermediates, nodes):
        self.params, self.intermediates, self.nodes = dict(params), list(intermediates), set(nodes)
        self.grads: Dict[Any, tuple] = {}

    def absorb(self, other: "_Group") -> None:
        self.params.update(other.params)
        self.intermediates += [n for n in other.intermediates if n not in self.intermediates]
        self.nodes |= other.nodes


def _param_groups(inputs: list, params: Dict[Any, torch.Tensor], parents) -> List[_Group]:
    """One group per set of parameters whose weight passes share a node (they must run together)."""
    # Every node on a path from the outputs to an input: the input pass runs these.
    on_input_path, _ = _closure(inputs, parents, set())
    groups: List[_Group] = []
    owner: Dict[Any, _Group] = {}
    for node, param in params.items():
        side, joins = _closure([node], parents, on_input_path)
        if not joins:
            continue  # not reached through the inputs: the fallback handles it
        nodes = side | joins
        if len(joins) > 1:  # the weight pass also runs what lies between these intermediates
            nodes |= _between(list(joins), parents, on_input_path)
        group = _Group({node: param}, joins, nodes)
        for other in {id(owner[n]): owner[n] for n in nodes if n in owner}.values():
            group.absorb(other)
            groups.remove(other)
        for n in group.nodes:
            owner[n] = group
        groups.append(group)
    return groups


class SplitBackward:
    """One micro-batch's backward, in two parts.

    Usage (per micro-batch, W parts in FIFO order)::

        h = SplitBackward.input_part(outputs, output_grads, inputs, params, split=ok)
        send_upstream(h.take_input_grads())      # also in x.grad for each input x (set_input_grads=True)
        ...
        h.weight_part()                          # fills p.grad; call exactly once

    Attributes:
        split: True if the backward really was split (False: full backward ran
            in ``input_part``, ``weight_part`` is a no-op).
        reason: why the fallback was taken (``None`` when split).
        input_grads: tuple aligned with ``inputs``: each input's gradient from
            this backward, or ``None`` for inputs that need no grad (until
            :meth:`take_input_grads`).
        released: bytes of saved tensors the input part released (see :mod:`.saved`).
    """

    def __init__(self, groups, split: bool, reason: Optional[str], input_grads, released: int = 0, deferred=()):
        self._groups = groups
        self._deferred = list(deferred)  # weight work custom Functions deferred (weight_store)
        self._done = False
        self.split = split or bool(self._deferred)  # True: weight gradients remain for weight_part()
        self.reason = reason
        self.input_grads = input_grads
        self.released = released

    def take_input_grads(self) -> tuple:
        """The input gradients, forgotten by this handle (a pending weight part must not keep them)."""
        grads, self.input_grads = self.input_grads, None
        return grads

    @staticmethod
    def input_part(outputs: Roots,
                   output_grads: Optional[TensorOrTensors],
                   inputs: Union[torch.Tensor, Sequence[Any]],
                   params: Iterable[torch.Tensor],
                   split: bool = True,
                   set_input_grads: bool = True) -> "SplitBackward":
        """Compute the input gradients; return a handle for the W part.

        Args:
            outputs: the stage's output tensor(s) or their ``GradientEdge``\\ s, or a scalar loss.
            output_grads: gradients for ``outputs`` (``None`` for a scalar loss).
            inputs: the stage's input tensor(s); entries that need no grad
                (integer token ids, non-tensors) are ignored.
            params: the stage's parameters; those without ``requires_grad``
                are ignored, duplicates (tied weights) are dropped.
            split: ``False`` forces the fallback (full backward now), e.g. from
                :func:`module_supports_split`.
            set_input_grads: also accumulate each input's gradient into its ``.grad``
                (``False``: only :attr:`input_grads` holds them).
        """
        ins = _as_list(inputs)
        grad_ins = [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad]
        seen: set = set()
        ps = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                ps.append(p)
        outs, grads = _outputs_and_grads(outputs, output_grads)

        reason = None
        if not split:
            reason = "split=False (a module opted out)"
        elif not split_available():
            reason = "this torch lacks torch.autograd.graph.GradientEdge"
        elif not outs:
            reason = "no output requires grad"
        elif not grad_ins:
            reason = "no input requires grad; weights are reachable only by a full backward"
        else:
            in_nodes = {_edge(t).node for t in grad_ins}
            if not all(_depends_on(_edge(o).node, in_nodes) for o in outs):
                reason = "an output does not depend on any input that requires grad"
            else:
                fused, bare = _custom_functions([_edge(o).node for o in outs], in_nodes, {_edge(p).node for p in ps})
                if bare is not None:
                    reason = (f"custom autograd Function {bare} (a split would run its backward twice); "
                              f"its backward runs once, here")

        if reason is None:
            handle = SplitBackward._try_split(outs, grads, ins, grad_ins, ps, set_input_grads, fused)
            if isinstance(handle, SplitBackward):
                return handle
            reason = handle

        old = [t.grad if (t.is_leaf or t.retains_grad) else None for t in grad_ins]
        for t in grad_ins:  # make .grad of non-leaf inputs visible, like the split path
            if t.grad_fn is not None:
                t.retain_grad()
            if not set_input_grads:
                t.grad = None
        deferred = []
        if outs:
            if split:  # custom Functions may still defer their own weight gradients to the weight pass
                with weight_store.collecting() as deferred:
                    torch.autograd.backward(outs, grad_tensors=grads)
            else:
                torch.autograd.backward(outs, grad_tensors=grads)
        input_grads = tuple(t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in ins)
        if not set_input_grads:
            for t, g in zip(grad_ins, old):
                t.grad = g
        return SplitBackward(None, False, reason, input_grads, deferred=deferred)

    @staticmethod
    def _try_split(outs, grads, ins, grad_ins, ps, set_input_grads, fused=frozenset()):
        """Run the I part; return a handle, or a reason string if the graph could not be split.

        ``fused``: custom Function nodes that hold parameters (:func:`_custom_functions`); the groups whose weight
        pass would run one are computed in this part (see :func:`_eager_groups`)."""
        roots = [_edge(o) for o in outs]
        parents = _reverse_graph([r.node for r in roots])
        groups = _param_groups([_edge(t).node for t in grad_ins], {_edge(p).node: p for p in ps}, parents)
        groups, eager = _eager_groups(groups, fused)
        hooks, old = [], [t.grad if (t.is_leaf or t.retains_grad) else None for t in grad_ins]
        deferred = []

        def capture(group, node):

            def hook(grad_outputs):
                group.grads[node] = grad_outputs

            return hook

        try:
            for group in groups:
                for node in group.intermediates:
                    hooks.append(node.register_prehook(capture(group, node)))
            with saved.attributing() as unpacked, weight_store.collecting() as deferred:
                found = _input_pass(roots, grad_ins + eager, grads)
        except RuntimeError as exc:  # nothing was accumulated anywhere: the caller can fall back
            for t, g in zip(grad_ins, old):
                t.grad = g
            if fused:  # a custom Function may have accumulated by hand: a second backward would count it twice
                raise
            return f"split input pass failed: {exc}"
        finally:
            for hook in hooks:
                hook.remove()
        if any(node not in group.grads for group in groups for node in group.intermediates):
            if fused:
                raise RuntimeError("deepspeed_dualpipe: the input pass of a split backward with a fused (custom) "
                                   "Function did not reach a weight gradient's path; dualpipe.split_backward: false "
                                   "avoids it")
            # The input pass did not run a node where a weight gradient starts; nothing has been accumulated
            # yet and the graph is whole, so a full backward still gives the right numbers.
            return "a weight gradient's path was not run by the input pass"
        found, eager_grads = found[:len(grad_ins)], found[len(grad_ins):]
        for p, g in zip(eager, eager_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        keep = set().union(*(group.nodes for group in groups)) if groups else set()
        released = saved.release(unpacked, keep)
        del unpacked
        by_input = {id(t): g for t, g in zip(grad_ins, found)}
        input_grads = []
        for t in ins:
            g = by_input.get(id(t)) if isinstance(t, torch.Tensor) else None
            if g is not None and set_input_grads:
                old = t.grad if (t.is_leaf or t.retains_grad) else None
                t.grad = g if old is None else old + g
                g = t.grad
            input_grads.append(g)
        return SplitBackward(groups, True, None, tuple(input_grads), released, deferred)

    def weight_part(self) -> None:
        """Accumulate the weight grads into ``p.grad`` and free the saved graph state.

        Must be called exactly once per handle; a second call raises RuntimeError.
        A no-op (apart from that check) when the fallback ran in ``input_part``.
        """
        if self._done:
            raise RuntimeError("SplitBackward.weight_part() was already called for this micro-batch")
        self._done = True
        groups, deferred = self._groups, self._deferred
        self._groups = self._deferred = None  # drop graph references even if the work raises
        weight_store.run(deferred)
        if not groups:
            return
        while groups:
            _weight_pass(groups.pop(0))


def _custom_functions(roots, inputs: set, param_nodes: set) -> Tuple[set, Optional[str]]:
    """The custom autograd Functions between ``roots`` and the ``inputs`` nodes (split-safe ones aside):
    ``(fused, bare)``. ``fused``: the nodes of those that hold one of the parameters (a fused norm or linear: a
    parameter's ``AccumulateGrad`` is among their next functions). ``bare``: the name of one that holds none
    (DeepSpeed's reentrant checkpoint, a collective): its parameters, if any, are out of the graph's sight, so
    only a full backward is safe; None if there is none."""
    fused, seen, todo = set(), set(inputs), deque(roots)
    while todo:
        node = todo.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(nxt for nxt, _ in node.next_functions)
        if not isinstance(node, torch.autograd.function.BackwardCFunction):
            continue
        forward_cls = getattr(node, "_forward_cls", None)
        if getattr(forward_cls, "dualpipe_split_safe", False):
            continue
        if not any(nxt in param_nodes for nxt, _ in node.next_functions):
            return fused, getattr(forward_cls, "__name__", type(node).__name__)
        fused.add(node)
    return fused, None


def _eager_groups(groups: List[_Group], fused: set) -> Tuple[List[_Group], list]:
    """``(split groups, eager parameters)``: a group whose weight pass would run a fused Function (its
    parameters' gradients start there) is not split -- the Function's one backward, in the input pass, computes
    them (as DeepSeek's DualPipe defers only the large GEMMs' weight gradients); every other group still is."""
    if not fused:
        return groups, []
    split, eager = [], []
    for group in groups:
        if group.nodes & fused:
            eager += list(group.params.values())
        else:
            split.append(group)
    return split, eager


def _input_pass(roots, inputs, grads):
    """Gradients of ``inputs``, keeping the graph for the weight pass (a seam for tests)."""
    return torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True)


def _weight_pass(group: _Group) -> None:
    """Run one group's weight pass: from the gradients that flowed into its intermediates to its
    parameters, each intermediate's incoming gradient clamped to the recorded one (a path through
    another intermediate of the group must not add to it again)."""
    edges, grads = [], []
    for node in group.intermediates:
        for i, g in enumerate(group.grads.get(node, ())):
            if g is not None:
                edges.append(GradientEdge(node, i))
                grads.append(g)
    if not edges:
        return
    hooks = []
    try:
        if len(group.intermediates) > 1:
            for node in group.intermediates:
                recorded = group.grads.get(node)
                if recorded is not None:
                    hooks.append(node.register_prehook(lambda grad_outputs, recorded=recorded: recorded))
        nodes, params = list(group.params), list(group.params.values())
        group.grads, group.intermediates, group.nodes = {}, [], set()
        dweights = torch.autograd.grad(edges, [GradientEdge(n, 0) for n in nodes], grads, allow_unused=True)
        del edges, grads
        for p, dw in zip(params, dweights):
            if dw is not None:
                p.grad = dw if p.grad is None else p.grad.add_(dw)
    finally:
        for hook in hooks:
            hook.remove()


__all__ = ["SplitBackward", "full_backward", "module_supports_split", "split_available"]
