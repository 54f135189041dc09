"""The engine every checkpoint test trains and saves: ``models.tied_specs()`` with SGD, fp32, no clipping."""

from tests.helpers import harness

MICRO_BATCH_SIZE = 2


def config(schedule, micro_batches=4, timeout_s=None) -> dict:
    result = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "gradient_accumulation_steps": micro_batches,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        }
    }
    if timeout_s is not None:
        result["dualpipe"] = {"p2p_timeout_s": timeout_s}
    return result


def engine(schedule, P, micro_batches=4, timeout_s=None):
    """Runs in a rank: the tied test model cut into ``P`` stages, under ``schedule``."""
    return harness.tied_engine(config(schedule, micro_batches, timeout_s), P)
