"""The runs of the equivalence tests, shared by the tests that reuse them (strict mode, engine features,
gradient path, mirror reduction, host syncs): the model, the config of a named run, :func:`train_all`,
which trains runs one after another inside each rank (process start-up dominates on 2 cores), and
:func:`launch`, one launch per shape for the whole suite."""

import functools

from deepspeed_dualpipe.schedule import SCHEDULES as REGISTRY
from tests.helpers import harness
from tests.helpers import models

SCHEDULES = list(REGISTRY)  # every registered schedule: a new one is tested here without editing this file
MBS, STEPS, SEED = 2, 3, 0

MODELS = {
    "tied": models.tied_specs,
    "untied": models.untied_specs,
    "tuple": models.tuple_specs,
    "mask": models.mask_specs
}


def micro_batches(P):
    return 2 * P  # the least that every schedule accepts (DualPipe: even, >= 2P)


CLIP = 0.05  # small enough that every step clips


def ds_config(schedule, P, dualpipe=None, **extra):
    config = {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": micro_batches(P),
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19.8 clips at 1.0 by default; the reference is plain SGD
        "pipeline": {
            "schedule": schedule
        },
        **extra,
    }
    if dualpipe:
        config["dualpipe"] = dualpipe
    return config


RUNS = {  # name -> (schedule, model, dualpipe settings, other config keys)
    **{s: (s, "tied", None, {}) for s in SCHEDULES},
    "dualpipe-untied": ("dualpipe", "untied", None, {}),
    "dualpipe-full-backward": ("dualpipe", "tied", {"split_backward": False}, {}),
    "1f1b-untied": ("1f1b", "untied", None, {}),
    "dualpipe-clipped": ("dualpipe", "tied", None, {"gradient_clipping": CLIP}),
    "dualpipev-clipped": ("dualpipev", "tied", None, {"gradient_clipping": CLIP}),
    "zb1p-clipped": ("zb1p", "tied", None, {"gradient_clipping": CLIP}),
    "interleaved-1f1b-clipped": ("interleaved-1f1b", "tied", None, {"gradient_clipping": CLIP}),
    "zbv-clipped": ("zbv", "tied", None, {"gradient_clipping": CLIP}),
    "dualpipe-zero1": ("dualpipe", "tied", None, {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}),
    "dualpipev-zero1": ("dualpipev", "tied", None, {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}),
    "interleaved-1f1b-overlap-clipped": ("interleaved-1f1b-overlap", "tied", None, {"gradient_clipping": CLIP}),
    **{f"{s}-zero1": (s, "tied", None, {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
       for s in ("1f1b", "ds-dualpipev")},  # DeepSpeed's own engines, as the status table claims
    **{f"{s}-bf16": (s, "tied", None, {"bf16": {"enabled": True}})
       for s in ("zb1p", "dualpipe", "dualpipev", "1f1b", "ds-dualpipev")},
    **{f"{s}-tuple": (s, "tuple", None, {}) for s in SCHEDULES},
    **{f"{s}-mask": (s, "mask", None, {}) for s in ("zb1p", "dualpipe", "dualpipev")},
}


def train_all(P, dp, runs):
    """Runs in every rank: each run's schedule through deepspeed_dualpipe.initialize."""
    import deepspeed_dualpipe

    batches = harness.make_batches(SEED, STEPS, dp, micro_batches(P), MBS)
    evals = harness.make_batches(SEED + 1, 2, dp, micro_batches(P), MBS)
    results = {}
    for name in runs:
        schedule, model, settings, extra = RUNS[name]
        results[name] = harness.train_pipeline(deepspeed_dualpipe.initialize,
                                               ds_config(schedule, P, settings, **extra),
                                               MODELS[model],
                                               P,
                                               STEPS,
                                               batches,
                                               eval_batches=evals)
    return results


STRICT_S = 60  # strict mode's timeout: generous on 2 shared cores (tests/distributed/test_strict_p2p.py)
EXTRA = {  # runs beside every schedule's, by (P, data-parallel degree); (2, 1) trains every run
    (2, 2): ("dualpipe-clipped", "dualpipe-zero1", "dualpipe-bf16"),
    (4, 1): ("dualpipe-clipped", "dualpipev-clipped")
}


@functools.lru_cache(maxsize=None)
def launch(P, dp):
    """Every rank's results of the runs at (P, dp): one launch per shape, read by test_equivalence and, without data
    parallelism, by test_strict_p2p, so those launches run in strict mode (NCCL's point-to-point rules emulated on
    gloo; the numbers are the same either way)."""
    runs = tuple(RUNS) if (P, dp) == (2, 1) else tuple(SCHEDULES) + EXTRA.get((P, dp), ())
    strict = STRICT_S if dp == 1 else None
    return harness.run_distributed(train_all, P * dp, P, dp, runs, timeout=900, strict_p2p=strict)
