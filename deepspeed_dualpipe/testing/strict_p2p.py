"""Strict mode: NCCL's point-to-point ordering, emulated on gloo for the multi-process tests.

gloo buffers a send and matches it whenever the receiver gets to it, so streams that deadlock on
NCCL pass on CPU. This module replaces the point-to-point calls of ``deepspeed.comm`` (``send``,
``recv``, ``isend``, ``irecv``, ``batch_isend_irecv``, which DeepSpeed's engines and the plugin's
all go through) with an emulation of NCCL's rules. It is an emulation, not NCCL:

- one order per communicator: every group of a process group (``batch_isend_irecv``'s ops, or a
  single send or receive) goes to that communicator's worker thread, which runs groups strictly one
  after the other in posting order, as NCCL's stream does;
- a send completes only once its receive is posted (rendezvous, no buffering): when the worker
  starts a group, it announces each receive to its sender (a ready token in a store, carrying the
  receive's size), and a send goes out only once the token of its receive has come; the ops of one
  group wait for their tokens together, so a group progresses as one, like an NCCL group;
- a bool tensor is refused, as NCCL has no bool type;
- ``wait()`` returns once the whole group has completed (NCCL's coalesced work), and never waits
  longer than the strict timeout: a stream that would hang on NCCL raises :class:`StrictP2PError`
  naming what each side was waiting for, and so does a send that meets a receive of another size
  (the two ranks post in different orders).

Collectives keep running on gloo, but :mod:`.strict_order` checks their order against the point-to-point
messages and each other: ranks that share two communicators must issue their operations on them in one
order (``StrictOrderError`` otherwise, naming both ranks, both communicators and both operations).

What it does not emulate: NCCL's buffering of small messages (stricter, so anything that passes
here passes there) and CUDA streams (a computation runs when the host reaches it; the host waits
where the engine waits).

Turn it on with ``install(timeout_s)`` on every rank right after ``init_distributed`` (the launcher
does when ``DS_DUALPIPE_STRICT_P2P`` holds a timeout in seconds; ``run_ranks(..., strict_p2p=...)``).
"""

import os
import queue
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from deepspeed_dualpipe.testing.strict_order import Collectives, OrderCheck, StrictOrderError, p2p_streams

ENV = "DS_DUALPIPE_STRICT_P2P"  # the strict timeout in seconds; set for ranks that should run strict
_POLL_S = 0.0005


class StrictP2PError(RuntimeError):
    """A point-to-point group that NCCL could not complete: a crossed order (a deadlock) or mismatched sizes."""


class _Work:
    """The request of one group: complete once all its ops are (NCCL's coalesced work)."""

    def __init__(self, strict, description):
        self.strict, self.description = strict, description
        self.event, self.error = threading.Event(), None

    def is_completed(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout=None) -> bool:
        # Twice the strict timeout by default: the worker gives its verdict on a stuck group within one,
        # counted from when the group started, and its message says more than this one.
        limit = 2 * self.strict.timeout_s if timeout is None else min(_seconds(timeout), 2 * self.strict.timeout_s)
        if not self.event.wait(limit) and self.error is None:
            raise StrictP2PError(f"timed out after {limit:.1f} s waiting for {self.description} (strict p2p, the NCCL "
                                 f"emulation: {self.strict.status()})")
        if self.error is not None:
            raise StrictP2PError(self.error)
        return True


class _Op:

    def __init__(self, kind, tensor, peer):
        self.kind, self.tensor, self.peer = kind, tensor, peer
        self.index = None  # its position among this rank's ops of the same kind with the same peer

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def __str__(self):
        return (f"{'send to' if self.kind == 'send' else 'receive from'} rank {self.peer} #{self.index} "
                f"({self.nbytes} bytes)")


class _Communicator:
    """One process group's FIFO: a worker thread that runs its groups in posting order."""

    def __init__(self, strict, name):
        self.strict, self.name = strict, name
        self.groups = queue.Queue()
        self.counts = {}  # (kind, peer) -> ops so far
        self.current = "idle"
        self.broken = None
        threading.Thread(target=self._run, name=f"strict-p2p-{name}", daemon=True).start()

    def post(self, ops) -> _Work:
        for op in ops:
            op.index = self.counts.get((op.kind, op.peer), 0)
            self.counts[op.kind, op.peer] = op.index + 1
        work = _Work(self.strict, "[" + ", ".join(map(str, ops)) + "]")
        self.groups.put((ops, work))
        return work

    def _run(self):
        while True:
            ops, work = self.groups.get()
            if self.broken is None:
                try:
                    self._complete(ops)
                except Exception as error:  # noqa: BLE001 - every later group fails with the first error
                    self.broken = f"rank {self.strict.rank}: {error}"
            work.error = self.broken
            work.event.set()

    def _complete(self, ops):
        strict, store = self.strict, self.strict.store
        self.current = "[" + ", ".join(map(str, ops)) + "]"
        data = []
        for op in ops:  # announce every receive: its sender may go on
            if op.kind == "recv":
                data.append(torch_dist.irecv(op.tensor, op.peer, group=strict.group))
                store.set(self._key(op.peer, strict.rank, op.index, "ready"), str(op.nbytes))
        waiting = list(ops)
        deadline = time.monotonic() + strict.timeout_s
        while waiting:
            for op in list(waiting):
                if op.kind == "send" and any(o.kind == "send" and o.peer == op.peer
                                             for o in waiting if o is not op and o.index < op.index):
                    continue  # gloo delivers in posting order per peer: a send goes out after the earlier ones
                if op.kind == "send":
                    key = self._key(strict.rank, op.peer, op.index, "ready")
                    if not store.check([key]):
                        continue
                    expected = int(store.get(key))
                    if expected != op.nbytes:
                        raise StrictP2PError(
                            f"its {op} met rank {op.peer}'s receive #{op.index} of {expected} bytes: the two ranks "
                            f"post their point-to-point operations in different orders (NCCL would deliver the wrong "
                            f"tensor or hang)")
                    data.append(torch_dist.isend(op.tensor.contiguous(), op.peer, group=strict.group))
                    store.set(self._key(strict.rank, op.peer, op.index, "sent"), "1")
                elif not store.check([self._key(op.peer, strict.rank, op.index, "sent")]):
                    continue
                waiting.remove(op)
            if waiting and time.monotonic() > deadline:
                raise StrictP2PError(
                    f"strict p2p (NCCL emulation) timed out after {strict.timeout_s:g} s: its group {self.current} "
                    f"is still waiting: " + ", ".join(f"{op} for rank {op.peer} to " +
                                                      ("post the matching receive" if op.kind == "send" else "send")
                                                      for op in waiting) +
                    "; on NCCL this stream deadlocks (each rank's groups run in posting order and a send waits "
                    "for its receive)")
            if waiting:
                time.sleep(_POLL_S)
        for request in data:
            request.wait(timedelta(seconds=strict.timeout_s))
        self.current = "idle"

    def _key(self, source, target, index, what):
        return f"{self.name}/{source}>{target}/{index}/{what}"


class StrictP2P:
    """The installed emulation (see the module's docstring)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = float(timeout_s)
        self.rank = torch_dist.get_rank()
        self.group = torch_dist.new_group(backend="gloo")  # the data travels on a group of its own
        self.store = torch_dist.TCPStore(os.environ["MASTER_ADDR"],
                                         int(os.environ["MASTER_PORT"]),
                                         is_master=False,
                                         timeout=timedelta(seconds=max(60.0, self.timeout_s)))
        self.order = OrderCheck(torch_dist.PrefixStore("dualpipe-strict-order", self.store), self.rank, self.timeout_s)
        self.store = torch_dist.PrefixStore("dualpipe-strict-p2p", self.store)
        self.communicators = {}
        self.lock = threading.Lock()

    def communicator(self, group) -> _Communicator:
        name = "world" if group is None else getattr(group, "group_name", None) or str(id(group))
        with self.lock:
            if name not in self.communicators:
                self.communicators[name] = _Communicator(self, name)
            return self.communicators[name]

    def status(self) -> str:
        return "; ".join(f"communicator {n} at {c.current}" for n, c in self.communicators.items()) or "idle"

    # ----- what replaces deepspeed.comm's point-to-point calls ------------------------------------
    def post(self, ops, group) -> _Work:
        for op in ops:
            if op.peer is None:
                raise StrictP2PError("strict p2p needs the peer of every receive (no receive from any source)")
            if op.tensor.device.type != "cpu":
                raise StrictP2PError("strict p2p emulates NCCL on gloo: CPU tensors only")
            if op.tensor.dtype == torch.bool:
                raise StrictP2PError(f"rank {self.rank}: a bool tensor sent to or received from rank {op.peer}: NCCL "
                                     f"has no bool type (send its bytes, tensor.view(torch.uint8))")
        self.order.issue(p2p_streams(self.rank, [(op.kind, op.peer) for op in ops]))  # issue order, vs collectives
        return self.communicator(group).post(ops)

    def batch_isend_irecv(self, p2p_op_list):
        group = p2p_op_list[0].group if p2p_op_list else None
        ops = [_Op("send" if op.op == "isend" else "recv", op.tensor, op.peer) for op in p2p_op_list]
        return [self.post(ops, group)]

    def isend(self, tensor, dst, group=None, tag=0):
        return self.post([_Op("send", tensor, dst)], group)

    def irecv(self, tensor, src=None, group=None, tag=0):
        return self.post([_Op("recv", tensor, src)], group)

    def send(self, tensor, dst, group=None, tag=0):
        self.isend(tensor, dst, group, tag).wait()

    def recv(self, tensor, src=None, group=None, tag=0):
        self.irecv(tensor, src, group, tag).wait()
        return src


_installed = None


def install(timeout_s: float) -> StrictP2P:
    """Route ``deepspeed.comm``'s point-to-point calls through the emulation (every rank, after init)."""
    global _installed
    from deepspeed.comm import comm as ds_comm
    if _installed is not None:
        raise RuntimeError("strict p2p is installed already")
    _installed = StrictP2P(timeout_s)
    backend = ds_comm.cdb
    _installed.saved = {
        name: getattr(backend, name)
        for name in ("send", "recv", "isend", "irecv", "batch_isend_irecv")
    }
    for name in _installed.saved:
        setattr(backend, name, getattr(_installed, name))
    _installed.collectives = Collectives(_installed.order)  # torch.distributed's: DeepSpeed's and the model's own
    _installed.collectives.install()
    return _installed


def installed() -> bool:
    return _installed is not None


def reset_order() -> None:
    """Forget the operations issued so far (:meth:`.strict_order.OrderCheck.reset`; every rank, at one point)."""
    _installed.order.reset()


def install_from_env() -> None:
    """:func:`install` with the timeout in ``DS_DUALPIPE_STRICT_P2P``, if it is set (the launcher calls it)."""
    if os.environ.get(ENV) and _installed is None:
        install(float(os.environ[ENV]))


def _seconds(timeout) -> float:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


__all__ = [
    "StrictP2PError", "StrictOrderError", "StrictP2P", "install", "installed", "install_from_env", "reset_order", "ENV"
]
