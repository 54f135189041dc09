"""The weight-gradient store: a custom autograd Function defers its own weight gradient to the W slot.

torch's split backward cannot see inside a custom ``torch.autograd.Function``: it would run the
Function's whole backward once for the input gradients and again for the weights. Such a graph is
therefore not split; its backward runs once, in the input pass (``BackwardInput``). A Function that
computes its weight gradient itself can still hand that work to the schedule's weight pass
(``BackwardWeight``), as Megatron-DeepSpeed's ``WeightGradStore`` does for ZB-H1::

    from deepspeed_dualpipe.runtime.autograd import weight_store

    class MyLinear(torch.autograd.Function):
        @staticmethod
        def backward(ctx, grad_output):
            x, weight = ctx.saved_tensors
            if weight_store.deferring():
                weight_store.defer(lambda: accumulate(weight, grad_output.t() @ x))
                grad_weight = None
            else:
                grad_weight = grad_output.t() @ x
            return grad_output @ weight, grad_weight

``deferring()`` is true only inside an input pass whose weight pass the schedule runs later; a full
backward (``BackwardPass``) computes everything at once. Deferred work must accumulate into
``weight.grad`` itself (the returned ``grad_weight`` is ``None``).
"""

from contextlib import contextmanager
from typing import Callable, List, Optional

_deferred: Optional[List[Callable[[], None]]] = None  # a list while an input pass collects


def deferring() -> bool:
    """True if a weight gradient computed now may be deferred to the schedule's weight pass."""
    return _deferred is not None


def defer(work: Callable[[], None]) -> None:
    """Run ``work`` (which accumulates a weight gradient) in the weight pass of the current micro-batch."""
    if _deferred is None:
        raise RuntimeError("weight_store.defer() called outside an input pass: check weight_store.deferring() first")
    _deferred.append(work)


@contextmanager
def collecting():
    """Within the block, :func:`defer` collects work into the list this yields (in backward order)."""
    global _deferred
    previous, _deferred = _deferred, []
    try:
        yield _deferred
    finally:
        _deferred = previous


def run(work: List[Callable[[], None]]) -> None:
    """The weight pass of deferred work, in the order it was deferred."""
    for item in work:
        item()


__all__ = ["deferring", "defer", "collecting", "run"]
