"""Split one micro-batch's backward into "I" (input grads) and "W" (weight grads).

ZeroBubble-style schedules such as DualPipe run a stage's backward in two parts:

* **I** -- :meth:`SplitBackward.input_part` computes the gradients w.r.t. the
  stage's input tensors (written to ``inputs[i].grad``) so they can be sent
  upstream at once;
* **W** -- :meth:`SplitBackward.weight_part`, called later (FIFO across
  micro-batches), accumulates into ``param.grad`` exactly like a normal
  ``backward()`` would, then frees the saved graph state.

The heavy lifting is done by PyTorch's private helpers
``stage_backward_input`` / ``stage_backward_weight`` from
``torch.distributed.pipelining._backward`` (imported in :func:`_torch_helpers`
only). Quirks of those helpers that this module handles:

* ``stage_backward_input`` calls ``detach_()`` on every output it is given.
  That raises for views (e.g. ``y.chunk(2)``, ``y.view(...)``) *after* the
  input grads were already written, and would strip ``requires_grad`` from a
  leaf output. Such outputs are therefore handed over as ``clone()``\\ s. Other
  outputs *are* detached in place: after ``input_part`` the caller's output
  tensors no longer carry a graph (this is what frees memory early).
* Parameters are only reached through graph nodes that depend on a stage input
  requiring grad. If no input requires grad (e.g. integer token ids on the
  first stage) or an output does not depend on any such input, the helpers
  would silently drop those parameter grads, so the full backward is used.
* Its parameter grouping can return overlapping groups (a parameter in two
  groups); ``stage_backward_weight`` then backprops twice through the same
  nodes ("Trying to backward through the graph a second time"). Overlapping
  groups are merged here before the W part.
* ``stage_backward_weight`` defaults to ``retain_graph=False`` -- the W part
  frees the graph; the groups it consumes are dropped afterwards.

Fallback: when the helpers are missing, the graph is unsupported, or the
caller passes ``split=False``, :meth:`SplitBackward.input_part` runs the full
backward (input *and* weight grads) and :meth:`SplitBackward.weight_part` is a
no-op, so the numbers stay right.

Custom autograd Functions (a Megatron linear, DeepSpeed's reentrant activation
checkpoint): torch's helpers would run such a Function's whole backward in both
parts. A graph holding one is not split: its backward runs once, in the input
part, and a Function can defer its own weight gradient to the weight part
through :mod:`.weight_store`. A Function class that sets
``dualpipe_split_safe = True`` (pure and cheap) is split like built-in ops.

Opting out: a custom layer whose backward must not be split (e.g. it relies on
backward hooks or a custom ``autograd.Function`` with side effects) sets the
class attribute ``supports_split_backward = False``. The engine computes
``split = module_supports_split(stage_module)`` once and passes it to
:meth:`SplitBackward.input_part`.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from deepspeed_dualpipe.runtime.autograd import weight_store

__all__ = ["SplitBackward", "full_backward", "module_supports_split", "split_available"]

TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _torch_helpers():
    """The one place the private torch API is imported; ``None`` if unavailable."""
    try:
        from torch.distributed.pipelining._backward import (
            stage_backward_input,
            stage_backward_weight,
        )
    except Exception:  # ImportError, or torch.distributed unavailable
        return None
    return stage_backward_input, stage_backward_weight


def split_available() -> bool:
    """True if this torch provides the private split-backward helpers."""
    return _torch_helpers() is not None


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
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x)


def _outputs_and_grads(outputs: TensorOrTensors, output_grads: Optional[TensorOrTensors]):
    """Keep the outputs that take part in autograd, with their matching grads."""
    outs = _as_list(outputs)
    grads = None if output_grads is None else _as_list(output_grads)
    if grads is not None and len(grads) != len(outs):
        raise ValueError(f"got {len(outs)} outputs but {len(grads)} output grads")
    keep_o, keep_g = [], []
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or not o.requires_grad:
            continue
        g = None if grads is None else grads[i]
        if grads is not None and g is None:
            continue  # no gradient flows into this output
        keep_o.append(o)
        keep_g.append(g)
    return keep_o, (None if grads is None else keep_g)


def full_backward(outputs: TensorOrTensors, output_grads: Optional[TensorOrTensors] = None) -> None:
    """Plain ``torch.autograd.backward`` (tensors that need no grad are skipped)."""
    outs, grads = _outputs_and_grads(outputs, output_grads)
    if outs:
        torch.autograd.backward(outs, grad_tensors=grads)


def _node(t: torch.Tensor):
    """The autograd node of ``t``: its grad_fn, or its AccumulateGrad for a leaf."""
    if t.grad_fn is not None:
        return t.grad_fn
    return t.view_as(t).grad_fn.next_functions[0][0]


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


def _unsplittable_function(outputs, stop: set) -> Optional[str]:
    """The name of a custom autograd Function in the graph of ``outputs`` (up to the ``stop`` nodes) whose
    backward torch's split would run twice, or None. A Function class that sets ``dualpipe_split_safe =
    True`` (pure, cheap, no side effects) may be run twice."""
    seen = set(stop)
    todo = deque(_node(o) for o in outputs)
    while todo:
        node = todo.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            forward_cls = getattr(node, "_forward_cls", None)
            if not getattr(forward_cls, "dualpipe_split_safe", False):
                return getattr(forward_cls, "__name__", type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return None


def _merge_groups(groups: list) -> list:
    """Merge parameter groups that share a parameter or an intermediate node.

    Each group is ``{"params": set, "intermediates": list, "grads": list}`` as
    produced by ``stage_backward_input``. Merging is always safe because
    ``stage_backward_weight`` clamps every intermediate's gradient to its saved
    value; it is needed because overlapping groups would backprop twice.
    """
    merged: list = []
    for g in groups:
        if "grads" not in g:
            raise RuntimeError("split backward: a parameter group received no gradient")
        g = {"params": set(g["params"]), "intermediates": list(g["intermediates"]), "grads": list(g["grads"])}
        for other in [
                m for m in merged if m["params"] & g["params"] or set(m["intermediates"]) & set(g["intermediates"])
        ]:
            merged.remove(other)
            g["params"] |= other["params"]
            for node, grad in zip(other["intermediates"], other["grads"]):
                if node not in g["intermediates"]:
                    g["intermediates"].append(node)
                    g["grads"].append(grad)
        merged.append(g)
    return merged


class SplitBackward:
    """One micro-batch's backward, in two parts.

    Usage (per micro-batch, W parts in FIFO order)::

        h = SplitBackward.input_part(outputs, output_grads, inputs, params, split=ok)
        send_upstream([x.grad for x in inputs])   # == h.input_grads
        ...
        h.weight_part()                          # fills p.grad; call exactly once

    Attributes:
        split: True if the backward really was split (False: full backward ran
            in ``input_part``, ``weight_part`` is a no-op).
        reason: why the fallback was taken (``None`` when split).
        input_grads: tuple aligned with ``inputs``: the input's ``.grad`` after
            the I part, or ``None`` for inputs that need no grad.
    """

    def __init__(self, params, groups, split: bool, reason: Optional[str], input_grads, deferred=()):
        self._params = params
        self._groups = groups
        self._deferred = list(deferred)  # weight work custom Functions deferred (weight_store)
        self._done = False
        self.split = split or bool(self._deferred)  # True: weight gradients remain for weight_part()
        self.reason = reason
        self.input_grads = input_grads

    @staticmethod
    def input_part(
        outputs: TensorOrTensors,
        output_grads: Optional[TensorOrTensors],
        inputs: Union[torch.Tensor, Sequence[Any]],
        params: Iterable[torch.Tensor],
        split: bool = True,
    ) -> "SplitBackward":
        """Compute and accumulate ``inputs[i].grad``; return a handle for the W part.

        Args:
            outputs: the stage's output tensor(s), or a scalar loss.
            output_grads: gradients for ``outputs`` (``None`` for a scalar loss).
            inputs: the stage's input tensor(s); entries that need no grad
                (integer token ids, non-tensors) are ignored.
            params: the stage's parameters; those without ``requires_grad``
                are ignored, duplicates (tied weights) are dropped.
            split: ``False`` forces the fallback (full backward now), e.g. from
                :func:`module_supports_split`.
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
        helpers = _torch_helpers()
        if not split:
            reason = "split=False (a module opted out)"
        elif helpers is None:
            reason = "torch.distributed.pipelining._backward is unavailable"
        elif not outs:
            reason = "no output requires grad"
        elif not grad_ins:
            reason = "no input requires grad; weights are reachable only by a full backward"
        else:
            in_nodes = {_node(t) for t in grad_ins}
            if not all(_depends_on(_node(o), in_nodes) for o in outs):
                reason = "an output does not depend on any input that requires grad"
            else:
                custom = _unsplittable_function(outs, in_nodes)
                if custom is not None:
                    reason = (f"custom autograd Function {custom} (torch's split would run its backward twice); "
                              f"its backward runs once, here")

        if reason is None:
            handle = SplitBackward._try_split(helpers[0], outs, grads, ins, grad_ins, ps)
            if isinstance(handle, SplitBackward):
                return handle
            reason = handle

        for t in grad_ins:  # make .grad of non-leaf inputs visible, like the split path
            if t.grad_fn is not None:
                t.retain_grad()
        deferred = []
        if outs:
            if split:  # custom Functions may still defer their own weight gradients to the weight pass
                with weight_store.collecting() as deferred:
                    torch.autograd.backward(outs, grad_tensors=grads)
            else:
                torch.autograd.backward(outs, grad_tensors=grads)
        input_grads = tuple(t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in ins)
        return SplitBackward(None, None, False, reason, input_grads, deferred)

    @staticmethod
    def _try_split(stage_backward_input, outs, grads, ins, grad_ins, ps):
        """Run torch's I part; return a handle, or a reason string if it failed cleanly."""
        # detach_() inside the helper fails on views and would strip requires_grad
        # from leaves: give it non-view aliases for those.
        safe_outs = [o.clone() if (o._is_view() or o.grad_fn is None) else o for o in outs]
        # Let the helper write fresh grads, then accumulate ourselves so a failure
        # leaves the caller's .grad untouched.
        old = [t.grad if (t.is_leaf or t.retains_grad) else None for t in grad_ins]
        for t in grad_ins:
            t.grad = None
        try:
            with warnings.catch_warnings():  # the helper reads .grad of non-leaf inputs
                warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
                _, groups = stage_backward_input(safe_outs, grads, ins, iter(ps))
            groups = _merge_groups(groups)
        except RuntimeError as exc:
            for t, g in zip(grad_ins, old):
                t.grad = g
            if any(o.grad_fn is None for o in outs):  # already detached: cannot fall back
                raise
            return f"torch split helper failed: {exc.__cause__ or exc}"
        for t, g in zip(grad_ins, old):
            if g is not None:
                new = t.grad
                t.grad = g if new is None else g.add_(new)
        input_grads = tuple(t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in ins)
        return SplitBackward(ps, groups, True, None, input_grads)

    def weight_part(self) -> None:
        """Accumulate the weight grads into ``p.grad`` and free the saved graph state.

        Must be called exactly once per handle; a second call raises RuntimeError.
        A no-op (apart from that check) when the fallback ran in ``input_part``.
        """
        if self._done:
            raise RuntimeError("SplitBackward.weight_part() was already called for this micro-batch")
        self._done = True
        params, groups, deferred = self._params, self._groups, self._deferred
        self._params = self._groups = self._deferred = None  # drop graph references even if the work raises
        weight_store.run(deferred)
        if groups:
            _torch_helpers()[1](iter(params), groups, retain_graph=False)
