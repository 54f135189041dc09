"""The (stages, micro-batches) shapes a schedule accepts, for tests that sweep them."""

from deepspeed_dualpipe.schedule import get_spec


def valid_shapes(schedule, max_stages=16):
    """Every (P, M) with 1 <= P <= ``max_stages`` and 2P <= M <= 2P + 6 that ``schedule`` accepts."""
    for P in range(1, max_stages + 1):
        for M in range(2 * P, 2 * P + 7):
            try:
                get_spec(schedule).validate(P, M)
            except ValueError:
                continue
            yield P, M
