"""The allocator-level memory meter (deepspeed_dualpipe/runtime/memory.py): it reads the bytes the allocator
holds around every instruction of a step, keeps nothing alive itself, and sees what no Python-side list of
tensors would (a step that leaves memory behind, a tensor freed on another thread)."""

import gc
import threading
import weakref

import pytest
import torch

from deepspeed_dualpipe.runtime.memory import MemoryMeter, gradient_bytes, malloc_bytes, parameter_bytes

N = 512  # a (N, N) fp32 tensor is 1 MiB
TILE = N * N * 4
SOURCES = ["profiler"] + (["malloc"] if malloc_bytes() is not None else [])


class _Engine(torch.nn.Module):
    """Just what the meter touches: a module, a device and an instruction table (as DeepSpeed's engines)."""

    class Forward:
        pass

    class Backward:
        pass

    def __init__(self, device="cpu", leak=False, temporary=0, carry=False, free_elsewhere=False):
        super().__init__()
        self.device = torch.device(device)
        self.module = torch.nn.Linear(N, N, bias=False).to(self.device)
        self.held, self.leak, self.temporary, self.kept = None, leak, temporary, []
        self.carry, self.carried, self.free_elsewhere = carry, None, free_elsewhere

    def _forward(self, **kwargs):
        if self.temporary:
            torch.ones(self.temporary // 4, device=self.device).sum()  # freed within the instruction
        x = torch.randn(N, N, device=self.device)  # saved by the matmul for the weight gradient
        self.held = torch.tanh(self.module(x))  # tanh keeps its output; the matmul's output is freed
        if self.leak:
            self.kept.append(x * 1)  # outlives the step, referenced by nothing the engine clears
        if self.carry:
            self.carried = torch.ones(N, N, device=self.device)  # replaces (frees) the last step's: as pipe buffers
        if self.free_elsewhere:
            self.kept.append(torch.ones(N, N, device=self.device))

    def _backward(self, **kwargs):
        held, self.held = self.held, None
        held.sum().backward()
        if self.free_elsewhere:  # as gloo frees an all-to-all's buffers on its own threads
            thread = threading.Thread(target=self.kept.clear)
            thread.start()
            thread.join()

    _INSTRUCTION_MAP = {Forward: _forward, Backward: _backward}

    def step(self):
        for kind in (self.Forward, self.Backward):
            self._INSTRUCTION_MAP[kind](self, chunk=0, micro_batch=3)
        return 1.0


def _measured(engine, source="profiler", primed=True):
    meter = MemoryMeter(engine, cpu=source)
    assert meter.measure(engine.step, prime=engine.step if primed else None) == 1.0
    assert meter.result.device == (source if engine.device.type == "cpu" else "cuda")
    return meter.result


def _about(measured, expected, source):
    """Exact from the profiler and CUDA; malloc also counts the graph's nodes and other small C++ objects."""
    return measured == expected if source != "malloc" else abs(measured - expected) < TILE // 16


def _check_a_step(device, source):
    engine = _Engine(device)
    memory = _measured(engine, source)  # the first step also allocates the weight's gradient: not an activation
    assert engine.module.weight.grad is not None
    assert _about(memory.peak, 2 * TILE, source) and memory.peak_at == "Forward(0, 3)"
    assert [(s.instruction, s.chunk, s.micro_batch) for s in memory.samples] == [("Forward", 0, 3), ("Backward", 0, 3)]
    assert _about(memory.samples[1].after, 0, source) and _about(memory.left, 0, source)
    assert "_INSTRUCTION_MAP" not in vars(engine)  # the class's table again
    assert parameter_bytes(engine.module) == gradient_bytes(engine.module) == TILE


@pytest.mark.parametrize("source", SOURCES)
def test_the_meter_reads_the_bytes_alive_after_each_instruction_beyond_parameters_and_gradients(source):
    _check_a_step("cpu", source)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: the meter reads torch.cuda's allocator")
def test_the_meter_reads_the_cuda_allocator():
    _check_a_step("cuda", None)


@pytest.mark.parametrize("source", SOURCES)
def test_the_meter_reports_what_a_step_leaves_behind(source):
    memory = _measured(_Engine(leak=True), source)
    assert _about(memory.left, TILE, source) and _about(memory.peak, 3 * TILE, source)


@pytest.mark.skipif("malloc" not in SOURCES, reason="needs glibc's mallinfo2")
def test_malloc_counts_what_another_thread_frees_and_the_profiler_does_not():
    assert _about(_measured(_Engine(free_elsewhere=True), "malloc").left, 0, "malloc")
    assert _measured(_Engine(free_elsewhere=True), "profiler").left == TILE  # the profiler's blind spot


def test_primed_the_profiler_sees_a_step_free_what_the_step_before_left_it():
    memory = _measured(_Engine(carry=True))
    assert memory.left == 0 and memory.peak == 2 * TILE  # the last step's buffer is freed as the new one comes
    assert memory.high_water >= 3 * TILE  # both, for a moment


def test_the_high_water_mark_includes_temporaries_inside_an_instruction():
    memory = _measured(_Engine(temporary=4 * TILE))
    assert memory.peak == 2 * TILE and memory.high_water >= 4 * TILE


@pytest.mark.parametrize("source", SOURCES)
def test_the_meter_keeps_nothing_alive(source):
    engine = _Engine()
    engine.step()  # the weight's gradient exists before the measured step
    x = {}
    original = engine._INSTRUCTION_MAP[_Engine.Forward]

    def forward(self, **kwargs):
        original(self, **kwargs)
        x["held"] = weakref.ref(self.held)

    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, _Engine.Forward: forward}
    memory = _measured(engine, source)
    gc.collect()
    assert x["held"]() is None and _about(memory.left, 0, source)


def test_a_recorded_steps_memory_is_the_meters_reading_with_its_temporaries():
    from deepspeed_dualpipe.runtime.profile import read_meter
    engine = _Engine(temporary=4 * TILE)
    meter = MemoryMeter(engine, cpu="profiler")
    meter.measure(engine.step, prime=engine.step)
    after, peak = read_meter(meter)  # what a profile's memory_after_bytes and activation_peak_bytes hold
    assert after == [2 * TILE, 0] and peak == meter.result.high_water >= 4 * TILE


def test_a_jobs_own_meter_is_read_through_its_peak_or_its_results_peak():
    from types import SimpleNamespace
    from deepspeed_dualpipe.runtime.profile import read_meter
    assert read_meter(SimpleNamespace(peak=7, after=[1, 2])) == ([1, 2], 7)
    assert read_meter(SimpleNamespace(result=SimpleNamespace(peak=9))) == ([], 9)
