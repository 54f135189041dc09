"""The sends a rank has posted and not yet seen complete: their tensors go once each has completed.

A send holds its tensors (detached) until it completes; keeping every send until the end of the
batch would keep every activation and gradient this rank sent for the whole step. Completed sends
are dropped at every wait point (each receive wait, each new send, the end of the batch), on the
engine's own thread, so that the memory is freed there (and a profiler of that thread sees it).

- **CPU (gloo)**: a send is known complete only by waiting on it, and it completes once its
  receiver posts the receive (a rendezvous), which the schedule may do much later. A background
  thread therefore waits on each send in posting order and notes when it completes (it keeps no
  reference to a send it has waited for). It gives a send twice ``dualpipe.p2p_timeout_s`` from its
  posting: a stuck receiver is reported first by this rank's own receive waits, or by
  :meth:`PendingSends.drain` at the end of the batch.
- **Elsewhere (NCCL)**: completion is polled without blocking (the process group keeps a send's
  tensors safe for the allocator until its stream is done).

:meth:`PendingSends.drain` ends the batch: every send must complete within one timeout, and the
first failure the thread saw is raised there (a rank's own waits report a dead peer first).
"""

import queue
import threading
import time
import weakref

from deepspeed_dualpipe.runtime.errors import PeerTimeout

_IDLE_S = 1.0  # how often an idle background thread checks whether its engine is gone


class _Send:
    __slots__ = ("requests", "peer", "tensors", "what", "posted", "token")

    def __init__(self, requests, peer, tensors, what, token):
        self.requests, self.peer, self.tensors, self.what = requests, peer, tensors, what
        self.posted, self.token = time.monotonic(), token


class PendingSends:
    """One engine's posted, not yet dropped sends (see the module docstring)."""

    def __init__(self, engine, background: bool):
        self._engine = engine
        self._background = background
        self._entries = []  # _Send, oldest first; dropped only on the engine's thread
        self._completed = set()  # tokens of the sends the background thread saw complete
        self._tokens = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue = queue.Queue()
        self._thread = None
        self._failure = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, requests, peer: int, tensors=(), what: str = "a tensor this rank sent") -> None:
        """A ``batch_isend_irecv``'s send requests to pipeline rank ``peer``, the tensors they send (held until
        the send completes), and what they carry (for errors)."""
        self.poll()
        with self._lock:
            self._tokens += 1
            send = _Send(requests, peer, tensors, what, self._tokens)
            self._entries.append(send)
            if self._background:
                self._queue.put(send)
                if self._thread is None:  # one per engine, for its lifetime (see _reap)
                    self._thread = threading.Thread(target=_reap,
                                                    args=(weakref.ref(self), self._queue),
                                                    name="dualpipe-sends",
                                                    daemon=True)
                    self._thread.start()

    def poll(self) -> None:
        """Drop the sends that have completed (called at every wait point, on the engine's thread)."""
        with self._lock:
            if self._background:
                done, self._completed = self._completed, set()
                self._entries = [s for s in self._entries if s.token not in done]
            else:
                self._entries = [s for s in self._entries if not all(r.is_completed() for r in s.requests)]

    def _note(self, token=None, failure=None) -> None:
        with self._lock:
            if failure is None:
                self._completed.add(token)
            else:
                self._failure = self._failure or failure
            self._changed.notify_all()

    def drain(self) -> None:
        """Wait until every send has completed, all within one ``dualpipe.p2p_timeout_s``; raise the first failure."""
        engine = self._engine
        deadline = time.monotonic() + engine._timeout.total_seconds()
        if not self._background:
            with self._lock:
                entries, self._entries = self._entries, []
            for send in entries:
                engine._wait_requests(send.requests,
                                      send.what,
                                      None,
                                      None,
                                      send.peer,
                                      deadline=deadline,
                                      source="to be received by")
            return
        with self._lock:
            while self._failure is None and any(s.token not in self._completed for s in self._entries):
                left = deadline - time.monotonic()
                if left <= 0:
                    send = next(s for s in self._entries if s.token not in self._completed)
                    self._entries, self._completed = [], set()
                    raise PeerTimeout.gave_up(engine, "the send did not complete", send.peer, send.what,
                                              "to be received by",
                                              time.monotonic() - send.posted)
                self._changed.wait(left)
            failure, self._failure = self._failure, None
            if failure is not None:
                self._entries, self._completed = [], set()
                raise failure
        self.poll()


def _reap(owner, sends: queue.Queue) -> None:
    """The background thread: wait on each send in posting order and note when it has completed. It holds
    its PendingSends weakly, and ends once that is gone."""
    while True:
        try:
            send = sends.get(timeout=_IDLE_S)
        except queue.Empty:
            if owner() is None:
                return
            continue
        pending = owner()
        if pending is None:
            return
        requests, peer, token, what = send.requests, send.peer, send.token, send.what
        deadline = send.posted + 2 * pending._engine._timeout.total_seconds()
        del send  # from here on only the engine's thread holds the send
        try:
            pending._engine._wait_requests(requests,
                                           what,
                                           None,
                                           None,
                                           peer,
                                           deadline=deadline,
                                           source="to be received by")
        except Exception as failure:  # noqa: BLE001 - raised by drain(), on the engine's thread
            pending._note(failure=failure)
        else:
            pending._note(token)
        finally:
            del requests, pending


__all__ = ["PendingSends"]
