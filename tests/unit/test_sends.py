"""Posted sends (deepspeed_dualpipe/runtime/sends.py): a send lets its tensors go as soon as it completes, not
at the end of the batch, and every failure or hang still surfaces at the end of the batch, naming the peer."""

import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from deepspeed_dualpipe.runtime.errors import PeerTimeout
from deepspeed_dualpipe.runtime.p2p import PointToPoint
from deepspeed_dualpipe.runtime.sends import PendingSends
from deepspeed_dualpipe.schedule.commit import Handshakes


class _Engine(PointToPoint):
    """What the sends read from an engine: its timeout, and enough to name ranks in an error."""

    stage_id, global_rank, schedule_name, device = 0, 0, "dualpipe", torch.device("cpu")

    def __init__(self, timeout_s=30.0):
        self._timeout = timedelta(seconds=timeout_s)

    def _peer(self, stage):
        return stage


class _Send:
    """A gloo-like send request: it holds its tensor and completes when its receiver (the test) says so."""

    def __init__(self, nbytes=1 << 20, fails=False, received=None):
        self.tensor = torch.zeros(nbytes // 4)
        self.received = received or threading.Event()
        self.fails = fails

    def wait(self, timeout):
        if self.fails:
            raise RuntimeError("Connection closed by peer")
        return self.received.wait(timeout.total_seconds())

    def is_completed(self):
        return self.received.is_set()


def _until(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_on_cpu_a_send_lets_its_tensor_go_at_the_first_wait_point_after_it_completed():
    sends, received, second = PendingSends(_Engine(), background=True), threading.Event(), _Send()
    first = _Send(received=received)
    storage = StorageWeakRef(first.tensor.untyped_storage())
    sends.add([first], peer=1)
    sends.add([second], peer=1)
    del first  # only the pending send holds it now
    assert len(sends) == 2 and not storage.expired()
    received.set()  # the receiver posted its receive: the send completes
    assert _until(lambda: sends.poll() or len(sends) == 1)  # poll: what the engine does at each wait
    assert storage.expired()  # long before the end of the batch
    second.received.set()
    sends.drain()
    assert len(sends) == 0


def test_elsewhere_completed_sends_are_dropped_at_each_poll():
    sends, done, pending = PendingSends(_Engine(), background=False), _Send(), _Send()
    sends.add([done], peer=1)
    sends.add([pending], peer=1)
    done.received.set()
    sends.poll()
    assert len(sends) == 1
    pending.received.set()
    sends.drain()
    assert len(sends) == 0


def test_a_failed_send_is_raised_at_the_end_of_the_batch_naming_the_peer():
    sends = PendingSends(_Engine(), background=True)
    sends.add([_Send(fails=True)], peer=1)
    with pytest.raises(RuntimeError,
                       match=r"pipeline rank 0 \(global rank 0\) lost its connection to pipeline rank 1"):
        sends.drain()
    assert len(sends) == 0


def test_the_end_of_the_batch_gives_up_on_a_send_that_never_completes_after_the_timeout():
    sends, stuck = PendingSends(_Engine(timeout_s=0.3), background=True), _Send()
    sends.add([stuck], peer=1)
    start = time.monotonic()
    with pytest.raises(PeerTimeout,
                       match=r"gave up waiting for a tensor this rank sent to be received by pipeline rank 1"):
        sends.drain()
    assert time.monotonic() - start < 5
    stuck.received.set()


def test_a_send_holds_its_tensor_detached_from_the_graph(monkeypatch):
    from deepspeed_dualpipe.runtime import p2p
    posted = []
    monkeypatch.setattr(p2p.dist, "P2POp", lambda op, tensor, peer: SimpleNamespace(op=op, tensor=tensor, peer=peer))
    monkeypatch.setattr(p2p.dist, "batch_isend_irecv", lambda ops: posted.extend(ops) or [_Send() for _ in ops])
    engine = _Engine()
    engine._send_reqs = PendingSends(engine, background=False)
    engine._queued, engine._sent_specs, engine._handshakes = [], {}, Handshakes()
    engine._handshakes.announced.add(0)  # not the channel's first message: the data alone
    x = torch.randn(4, requires_grad=True)
    y = x * 2  # its grad_fn holds the graph that made it
    engine.slots = [SimpleNamespace(outputs=y)]
    engine._exec_send_activations(0, 0, 0, 1)
    engine._commit()
    assert posted[0].tensor.grad_fn is None and posted[0].tensor.data_ptr() == y.data_ptr()
    assert len(engine._send_reqs) == 1
