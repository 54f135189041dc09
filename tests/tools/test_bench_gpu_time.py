"""The bench's layers spend their time on the GPU stream on CUDA (a spin kernel calibrated against CUDA events)
and sleep on the host elsewhere, as before. What a CPU can check: the calibration arithmetic on a fake clock,
the routing of each layer time by the tensor's device, and the CPU path unchanged. The GPU runs themselves are
tests/gpu/test_bench_gpu.py."""

import contextlib

import pytest
import torch

from deepspeed_dualpipe.tools.bench import layers as L


class _FakeGpu:
    """A GPU whose spin runs ``rate`` cycles a second, whose first launch also pays ``load_s`` (loading the
    kernel), and whose event clock is exact."""

    def __init__(self, rate, load_s=0.0):
        self.rate, self.load_s, self.now, self.launches = rate, load_s, 0.0, 0

    def spin(self, cycles):
        self.now += cycles / self.rate + (self.load_s if self.launches == 0 else 0.0)
        self.launches += 1

    def seconds_of(self, fn):
        start = self.now
        fn()
        return self.now - start


def test_the_calibration_measures_the_spin_rate_and_leaves_the_first_launchs_load_out():
    gpu = _FakeGpu(rate=1.41e9, load_s=0.05)
    assert L.calibrate(gpu.spin, gpu.seconds_of, cycles=1_000_000, repeats=3) == pytest.approx(1.41e9)
    assert gpu.launches == 4  # one warm-up, then three timed


def test_the_calibration_refuses_a_clock_that_did_not_move():
    with pytest.raises(RuntimeError, match="must be > 0"):
        L.calibrate(lambda cycles: None, lambda fn: 0.0)


def test_a_layer_time_becomes_that_many_cycles_at_the_calibrated_rate():
    assert L.cycles_for(0.005, 1.5e9) == 7_500_000
    assert L.cycles_for(1e-12, 1.5e9) == 1  # never a zero-length spin


def test_a_cuda_tensors_layer_time_is_one_spin_on_its_stream_and_the_host_does_not_sleep(monkeypatch):
    spins, rates = [], []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_sleep", spins.append)
    monkeypatch.setattr(L.time, "sleep", lambda s: pytest.fail("slept on the host"))
    monkeypatch.setattr(L, "calibrate", lambda spin, seconds_of: rates.append(1) or 2e9)
    monkeypatch.setattr(L, "_CYCLES_PER_SECOND", {})

    class CudaTensor:
        is_cuda, device = True, "cuda:0"

    L.SLEEPS.clear()
    L._sleep(0.004, CudaTensor())
    L._sleep(0.001, CudaTensor())
    assert spins == [8_000_000, 2_000_000]
    assert rates == [1]  # calibrated once per device, on first use
    assert L.SLEEPS == []  # no host time to attribute: the stream holds it


def test_on_the_cpu_the_layers_sleep_on_the_host_as_before(monkeypatch):
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: pytest.fail("spun a GPU for a CPU tensor"))
    layer = L.SleepLayer(0.003, 0.004, 0.001)
    L.SLEEPS.clear()
    layer(torch.randn(1, 8)).sum().backward()
    assert sorted(round(requested, 6) for _, _, requested in L.SLEEPS) == [0.001, 0.003, 0.003]  # F, B - W, W
    assert all(end - start >= requested * 0.9 for start, end, requested in L.SLEEPS)


def test_every_layer_time_names_the_tensor_whose_device_it_runs_on(monkeypatch):
    """Each sleeping piece passes a tensor it works on, so on CUDA none of them falls back to the host."""
    calls = []
    monkeypatch.setattr(L, "_sleep", lambda seconds, on=None: calls.append(on))
    L.SleepLayer(0.003, 0.004, 0.001)(torch.randn(1, 8)).sum().backward()
    L.SleepMoELayer(0.002, 0.004, 0.002, 4096, ep_size=1)(torch.randn(1, 8)).sum().backward()
    assert len(calls) == 3 + 6  # SleepLayer: F, B - W, W; the MoE layer: 2 islands x (F/2, (B - W)/2, W/2)
    assert all(isinstance(on, torch.Tensor) for on in calls), calls
