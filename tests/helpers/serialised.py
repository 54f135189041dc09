"""A planted defect for the overlap tests: an interleaving that serialises the all-to-alls.

:func:`serialised_interleave` drives two micro-batches' steps alternately, as
:func:`deepspeed_dualpipe.runtime.autograd.steps.interleave` does, but waits for each all-to-all as
soon as it is launched, before handing over to the other micro-batch. Its trace looks interleaved (the
compute steps of the two alternate), yet nothing of one micro-batch runs while the other's
all-to-all is in flight: the measure of :mod:`deepspeed_dualpipe.runtime.overlap` must see no hidden
all-to-all in it.
"""

from deepspeed_dualpipe.runtime.autograd.steps import interleave as _interleave  # the original, if patched


def waiting_at_once(gen):
    """``gen``'s steps, each all-to-all waited for as soon as it is launched."""
    try:
        pending = next(gen)
        while True:
            pending.wait()
            yield pending
            pending = gen.send(None)
    except StopIteration as stop:
        return stop.value


def serialised_interleave(first, second, events=None, labels=("first", "second"), device=None, clock=None):
    return _interleave(waiting_at_once(first), waiting_at_once(second), events, labels, device, clock)
