"""The allocator-level memory meter (deepspeed_dualpipe/tools/memory.py): it reads the bytes the allocator
holds around every instruction of a step, keeps nothing alive itself, and sees what no Python-side list of
tensors would (a step that leaves memory behind)."""

import gc
import weakref

import pytest
import torch

from deepspeed_dualpipe.tools.memory import MemoryMeter, gradient_bytes, parameter_bytes

N = 64  # a (N, N) fp32 tensor is 16 KiB
TILE = N * N * 4


class _Engine(torch.nn.Module):
    """Just what the meter touches: a module, a device and an instruction table (as DeepSpeed's engines)."""

    class Forward:
        pass

    class Backward:
        pass

    def __init__(self, device="cpu", leak=False, temporary=0, carry=False):
        super().__init__()
        self.device = torch.device(device)
        self.module = torch.nn.Linear(N, N, bias=False).to(self.device)
        self.held, self.leak, self.temporary, self.kept = None, leak, temporary, []
        self.carry, self.carried = carry, None

    def _forward(self, **kwargs):
        if self.temporary:
            torch.ones(self.temporary // 4, device=self.device).sum()  # freed within the instruction
        x = torch.randn(N, N, device=self.device)  # saved by the matmul for the weight gradient
        self.held = torch.tanh(self.module(x))  # tanh keeps its output; the matmul's output is freed
        if self.leak:
            self.kept.append(x * 1)  # outlives the step, referenced by nothing the engine clears
        if self.carry:
            self.carried = torch.ones(N, N, device=self.device)  # replaces (frees) the last step's: as pipe buffers

    def _backward(self, **kwargs):
        held, self.held = self.held, None
        held.sum().backward()

    _INSTRUCTION_MAP = {Forward: _forward, Backward: _backward}

    def step(self):
        for kind in (self.Forward, self.Backward):
            self._INSTRUCTION_MAP[kind](self, chunk=0, micro_batch=3)
        return 1.0


def _measured(engine, primed=True):
    meter = MemoryMeter(engine)
    assert meter.measure(engine.step, prime=engine.step if primed else None) == 1.0
    return meter.result


def _check_a_step(device):
    engine = _Engine(device)
    memory = _measured(engine)  # the first step also allocates the weight's gradient: not an activation
    assert engine.module.weight.grad is not None
    assert memory.peak == 2 * TILE and memory.peak_at == "Forward(0, 3)"
    assert [(s.instruction, s.chunk, s.micro_batch, s.after) for s in memory.samples] == [("Forward", 0, 3, 2 * TILE),
                                                                                          ("Backward", 0, 3, 0)]
    assert memory.left == 0
    assert "_INSTRUCTION_MAP" not in vars(engine)  # the class's table again
    assert parameter_bytes(engine.module) == gradient_bytes(engine.module) == TILE


def test_the_meter_reads_the_bytes_alive_after_each_instruction_beyond_parameters_and_gradients():
    _check_a_step("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: the meter reads torch.cuda's allocator")
def test_the_meter_reads_the_cuda_allocator():
    _check_a_step("cuda")


def test_the_meter_reports_what_a_step_leaves_behind():
    engine = _Engine(leak=True)
    memory = _measured(engine)
    assert memory.left == TILE and memory.peak == 3 * TILE


def test_primed_the_meter_sees_a_step_free_what_the_step_before_left_it():
    memory = _measured(_Engine(carry=True))
    assert memory.left == 0 and memory.peak == 2 * TILE  # the last step's buffer is freed as the new one comes
    assert memory.high_water >= 3 * TILE  # both, for a moment


def test_unprimed_on_cpu_what_was_allocated_before_the_profiler_is_freed_unseen():
    engine = _Engine(carry=True)
    engine.step()
    memory = _measured(engine, primed=False)
    assert memory.left == TILE  # too high: why bench and demo prime


def test_the_high_water_mark_includes_temporaries_inside_an_instruction():
    memory = _measured(_Engine(temporary=1 << 20))
    assert memory.peak == 2 * TILE and memory.high_water >= 1 << 20


def test_the_meter_keeps_nothing_alive():
    engine = _Engine()
    engine.step()  # the weight's gradient exists before the measured step
    x = {}
    original = engine._INSTRUCTION_MAP[_Engine.Forward]

    def forward(self, **kwargs):
        original(self, **kwargs)
        x["held"] = weakref.ref(self.held)

    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, _Engine.Forward: forward}
    memory = _measured(engine)
    gc.collect()
    assert x["held"]() is None and memory.left == 0
