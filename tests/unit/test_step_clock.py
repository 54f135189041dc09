"""A recorded step's figures on CUDA: waits and instructions timed by events on the stream, read once at the end.

On CUDA the host returns from a launch, and from a wait on a peer, at once: the stream waits. A fake device
(its own clock, and events recorded on it) shows what the host clock would miss."""

import contextlib
import types

import pytest
import torch

from deepspeed_dualpipe.runtime.autograd import steps
from deepspeed_dualpipe.runtime.autograd.clocks import CudaClock
from deepspeed_dualpipe.runtime.p2p import PointToPoint
from deepspeed_dualpipe.runtime.trace import InstructionClock


class FakeDevice:
    """The device's timeline (seconds): kernels and stream waits advance it; the host does not wait for it."""

    def __init__(self):
        self.t = 0.0

    def run(self, seconds):
        self.t += seconds


class FakeEvent:

    def __init__(self, device):
        self.t = device.t  # recorded on the stream: it fires when the stream reaches this point

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3  # milliseconds, as torch.cuda.Event's


class FakeCudaClock(CudaClock):

    def __init__(self, device):
        self.fake = device
        super().__init__("cuda")

    def _event(self):
        return FakeEvent(self.fake)

    def _synchronize(self):
        pass


class PeerRequest:
    """A posted receive on CUDA: ``wait()`` makes the stream wait for the peer's send; the host returns at once."""

    def __init__(self, device, peer_late_by):
        self.device, self.late = device, peer_late_by

    def wait(self, *timeout):
        self.device.run(self.late)


def _rank(device, clock):
    """The part of the plugin's engine that waits on a peer, on a fake CUDA device."""
    engine = types.SimpleNamespace(device=torch.device("cuda"), step_clock=clock, _waited=0.0, _wait_stamps=[])
    engine._send_reqs = types.SimpleNamespace(poll=lambda: None)
    engine._timed = lambda *names: contextlib.nullcontext()
    engine._wait_requests = types.MethodType(PointToPoint._wait_requests, engine)
    return engine


def test_a_wait_on_a_peer_is_measured_on_the_stream_as_a_wait_and_the_step_is_read_once():
    device = FakeDevice()
    clock = FakeCudaClock(device)
    engine = _rank(device, clock)
    timer = InstructionClock(engine, clock)
    kind = type("RecvActivation", (), {})
    for late in (0.050, 0.020):
        timer.before(kind, {"buffer_id": 0})
        device.run(0.010)  # compute queued before the wait
        PointToPoint._wait(engine, [PeerRequest(device, late)], "the activation", 0, 0, (1, 0))
        device.run(0.005)  # compute after it
        timer.after(kind, {"buffer_id": 0})
    assert clock.synchronizations == 0  # nothing read while the step runs
    trace, _, _ = timer.resolve()
    assert clock.synchronizations == 1
    assert [t.waited for t in trace] == pytest.approx([0.050, 0.020])
    assert [t.end - t.start for t in trace] == pytest.approx([0.065, 0.035])
    assert engine._waited < 0.01  # the host's view: the wait returned at once


def test_a_recorded_step_keeps_its_phases_as_device_stamps_for_one_read_at_the_end():

    def chunk():
        yield from ()
        return "out"

    clock, events = FakeCudaClock(FakeDevice()), []
    assert steps.run(chunk(), events=events, label="F0.0", device="cuda", clock=clock) == "out"
    assert clock.synchronizations == 0 and isinstance(events[0][1], FakeEvent)
    ((label, start, end), ) = clock.resolve(events)
    assert clock.synchronizations == 1 and label == "F0.0:compute" and end >= start


def test_a_timeline_recording_on_cuda_reads_its_events_once_when_asked_and_times_waits_on_the_stream():
    from deepspeed_dualpipe.runtime.trace import resolve_recording, start_recording, stop_recording
    device = FakeDevice()
    clock = FakeCudaClock(device)
    engine = _rank(device, clock)
    kind = type("RecvGrad", (), {})

    def receive(self, **kwargs):
        device.run(0.010)
        PointToPoint._wait(self, [PeerRequest(device, 0.030)], "the gradient", 0, 0, (1, 0))

    engine._INSTRUCTION_MAP = {kind: receive}
    engine.phase_events = None
    trace = start_recording(engine, clock)
    for _ in range(3):
        engine._INSTRUCTION_MAP[kind](engine, buffer_id=0)
    assert trace == [] and clock.synchronizations == 0  # nothing read while recording
    resolve_recording(engine)
    assert clock.synchronizations == 1
    assert [t.waited for t in trace] == pytest.approx([0.030] * 3)
    assert [t.end - t.start for t in trace] == pytest.approx([0.040] * 3)
    stop_recording(engine)
    assert engine.step_clock is None and engine._INSTRUCTION_MAP[kind] is receive
