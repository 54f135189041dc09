"""The plugin's figures go where DeepSpeed puts its own: its monitor (here ``csv_monitor``, real files read
back), written by global rank 0 at DeepSpeed's sample count, with DeepSpeed's naming.

One launch of 4 ranks (P=2 pipeline ranks, data parallelism 2 with expert parallelism 2 inside it) trains
an MoE model under dualpipev for 4 steps with ``monitor_interval: 2`` and ``monitor_memory``: steps 0
and 2 are timed, and on CPU steps 1 and 3 read the allocator for memory.
"""

import csv
import functools
import os

import pytest

from tests.helpers import harness
from tests.helpers import models

P, DP, EP, MBS, STEPS = 2, 2, 2, 2, 4


def _config(out_dir, schedule, overlap=True):
    return {
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": 2 * P,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "pipeline": {
            "schedule": schedule
        },
        "dualpipe": {
            "overlap_moe_a2a": overlap,
            "monitor_interval": 2,
            "monitor_memory": True
        },
        "csv_monitor": {
            "enabled": True,
            "output_path": out_dir,
            "job_name": f"{schedule}-{'overlap' if overlap else 'plain'}"
        },
    }


def _train(out_dir, runs):
    import deepspeed_dualpipe
    batches = harness.make_batches(0, STEPS, DP, 2 * P, MBS)
    for schedule, overlap in runs:
        harness.train_pipeline(deepspeed_dualpipe.initialize, _config(out_dir, schedule, overlap),
                               functools.partial(models.moe_specs, ep_size=EP), P, STEPS, batches)
    return os.getpid()


RUNS = (("dualpipev", True), ("dualpipev", False), ("zbv", True))


@functools.lru_cache(maxsize=None)
def _launch(out_dir):
    harness.run_distributed(_train, P * DP, out_dir, RUNS, timeout=600)
    return out_dir


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    return _launch(str(tmp_path_factory.mktemp("monitor")))


def _read(out_dir, job, name):
    """{step: value} of one monitor figure, as DeepSpeed's csv_monitor wrote it (header: 'step', last name part)."""
    path = os.path.join(out_dir, job, name.replace("/", "_") + ".csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", name.split("/")[-1]], rows[0]
    steps = [int(step) for step, _ in rows[1:]]
    assert len(steps) == len(set(steps)), f"{name}: written more than once per step: {steps}"
    return {int(step): float(value) for step, value in rows[1:]}


@pytest.mark.slow
@pytest.mark.parametrize("job", ["dualpipev-overlap", "dualpipev-plain", "zbv-overlap"])
def test_bubble_waits_and_hidden_time_are_written_every_interval_at_deepspeeds_sample_count(monitored, job):
    loss = _read(monitored, job, "Train/Samples/train_loss")  # DeepSpeed's own figure, every step
    assert len(loss) == STEPS
    timed = sorted(loss)[0::2]  # steps 0 and 2 (DeepSpeed counts samples after each step)
    for name in ("pipe_bubble_measured", "pipe_wait_ms", "pipe_overlap_hidden_ms"):
        for suffix in ("", "_rank0", "_rank1"):
            figure = _read(monitored, job, f"Train/Samples/{name}{suffix}")
            assert sorted(figure) == timed, (name + suffix, figure)
    for value in _read(monitored, job, "Train/Samples/pipe_bubble_measured").values():
        assert 0.0 < value < 1.0
    simulated = _read(monitored, job, "Train/Samples/pipe_bubble_simulated")
    assert sorted(simulated) == timed and all(0.0 <= v < 1.0 for v in simulated.values())
    assert all(v >= 0.0 for v in _read(monitored, job, "Train/Samples/pipe_wait_ms").values())


@pytest.mark.slow
def test_overlap_hides_all_to_all_time_only_when_the_pairs_interleave(monitored):
    hidden = _read(monitored, "dualpipev-overlap", "Train/Samples/pipe_overlap_hidden_ms")
    assert all(v > 0.0 for v in hidden.values())
    plain = _read(monitored, "dualpipev-plain", "Train/Samples/pipe_overlap_hidden_ms")
    assert all(v == 0.0 for v in plain.values())
    zbv = _read(monitored, "zbv-overlap", "Train/Samples/pipe_overlap_hidden_ms")
    assert all(v == 0.0 for v in zbv.values())  # ZB-V has no overlapped pairs


@pytest.mark.slow
@pytest.mark.parametrize("job", ["dualpipev-overlap", "zbv-overlap"])
def test_peak_activation_memory_is_written_from_the_allocator_in_the_steps_after_the_timed_ones(monitored, job):
    loss = _read(monitored, job, "Train/Samples/train_loss")
    memory_steps = sorted(loss)[1::2]  # on CPU: steps 1 and 3
    overall = _read(monitored, job, "Train/Samples/pipe_peak_activation_bytes")
    assert sorted(overall) == memory_steps
    per_rank = [_read(monitored, job, f"Train/Samples/pipe_peak_activation_bytes_rank{r}") for r in range(P)]
    for step in memory_steps:
        assert all(r[step] > 0 for r in per_rank)
        assert overall[step] == max(r[step] for r in per_rank)


@pytest.mark.slow
def test_every_job_writes_into_its_own_csv_monitor_directory(monitored):
    assert sorted(os.listdir(monitored)) == sorted(["dualpipev-overlap", "dualpipev-plain", "zbv-overlap"])
