"""No host stalls in the steady state: per step, no more host syncs than DeepSpeed's 1F1B, and none per micro-batch.

A host sync (``item()``, ``tolist()``, ``cpu()``, ``numpy()``, ``bool``/``int``/``float`` of a tensor,
``synchronize``) makes the CPU wait for the GPU; in the per-instruction path it drains the GPU every
time. Counted here on CPU (``deepspeed_dualpipe.testing.host_syncs``), inside ``train_batch`` of a
batch after the first (which exchanges the activation shapes once): every plugin schedule makes no more
than DeepSpeed's own 1F1B at the same P and M, and the count does not grow with M.
"""

import functools

import pytest

from tests.helpers import equivalence
from tests.helpers import harness

P = 2
SCHEDULES = ["1f1b", "zb1p", "dualpipe", "dualpipev"]
MS = (2 * P, 4 * P)
CONFIGS = {"fp32": {}, "clipped": {"gradient_clipping": 1e-3}, "bf16": {"bf16": {"enabled": True}}}


def _count(schedule, M, extra):
    import deepspeed_dualpipe
    from deepspeed.pipe import PipelineModule
    import torch
    from deepspeed_dualpipe.testing.host_syncs import count_host_syncs
    from tests.helpers.models import loss_fn, tied_specs
    config = dict(equivalence.ds_config(schedule, P, None, **extra), gradient_accumulation_steps=M)
    torch.manual_seed(0)
    with torch.no_grad():
        model = PipelineModule(layers=tied_specs(), num_stages=P, loss_fn=loss_fn, partition_method="uniform")
    engine = deepspeed_dualpipe.initialize(model=model, config=config, optimizer=harness._sgd)[0]
    batches = harness.make_batches(0, 2, 1, M, equivalence.MBS)
    engine.train_batch(iter(batches[0][0]))  # the first batch: shapes, buffers, optimizer state
    with count_host_syncs() as counts:
        engine.train_batch(iter(batches[1][0]))
    return dict(counts)


def _count_all():
    return {(s, M, c): _count(s, M, CONFIGS[c]) for c in CONFIGS for s in SCHEDULES for M in MS}


@functools.lru_cache(maxsize=None)
def _counts():
    per_rank = harness.run_distributed(_count_all, P, timeout=900)
    return {key: max(sum(r[key].values()) for r in per_rank) for key in per_rank[0]}, per_rank


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_a_step_makes_no_more_host_syncs_than_deepspeeds_1f1b_and_none_per_micro_batch(schedule, config):
    totals, _ = _counts()
    for M in MS:
        assert totals[schedule, M, config] <= totals["1f1b", M, config], (schedule, M, config, totals)
    assert totals[schedule, MS[0], config] == totals[schedule, MS[1], config], (schedule, config, totals)
