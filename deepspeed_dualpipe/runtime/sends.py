"""The sends a rank has posted and not yet seen complete: their tensors go as soon as each completes.

A send holds its tensors (detached) until it completes; keeping every send until the end of the
batch would keep every activation and gradient this rank sent for the whole step.

- **CPU (gloo)**: a send is known complete only by waiting on it, and it completes once its
  receiver posts the receive (a rendezvous), which the schedule may do much later. A background
  thread therefore waits on each send in posting order and drops it when it completes. It gives a
  send twice ``dualpipe.p2p_timeout_s`` from its posting: a stuck receiver is reported first by
  this rank's own receive waits, or by :meth:`PendingSends.drain` at the end of the batch.
- **Elsewhere (NCCL)**: completion can be polled without blocking; :meth:`PendingSends.poll` drops
  the completed sends at every receive wait (the process group keeps a send's tensors safe for the
  allocator until its stream is done).

:meth:`PendingSends.drain` ends the batch: every send must complete within one timeout, and the
first failure the thread saw is raised there (a rank's own waits report a dead peer first).
"""

import queue
import threading
import time

from deepspeed_dualpipe.runtime.errors import PeerTimeout

_IDLE_S = 1.0  # the background thread ends after this long without sends


def _what(requests) -> str:
    return f"{len(requests)} tensor(s) this rank sent to be received"


class PendingSends:
    """One engine's posted, not yet completed sends (see the module docstring)."""

    def __init__(self, engine, background: bool):
        self._engine = engine
        self._background = background
        self._entries = []  # (requests, peer, posted at), oldest first
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue = queue.Queue()
        self._thread = None
        self._failure = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, requests, peer: int) -> None:
        """A ``batch_isend_irecv``'s send requests to pipeline rank ``peer`` (they hold the tensors)."""
        entry = (requests, peer, time.monotonic())
        with self._lock:
            self._entries.append(entry)
            if self._background:
                self._queue.put(entry)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._reap, name="dualpipe-sends", daemon=True)
                    self._thread.start()

    def poll(self) -> None:
        """Drop the sends that have completed (where completion can be polled; see the module docstring)."""
        if self._background:
            return
        with self._lock:
            self._entries = [e for e in self._entries if not all(r.is_completed() for r in e[0])]

    def _reap(self) -> None:
        while True:
            try:
                entry = self._queue.get(timeout=_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            requests, peer, posted = entry
            deadline = posted + 2 * self._engine._timeout.total_seconds()
            try:
                self._engine._wait_requests(requests,
                                            _what(requests),
                                            None,
                                            None,
                                            peer,
                                            deadline=deadline,
                                            source="by")
            except Exception as failure:  # noqa: BLE001 - raised by drain(), on the engine's thread
                with self._lock:
                    self._failure = self._failure or failure
                    self._changed.notify_all()
                continue
            finally:
                del requests  # this thread must not keep a completed send's tensors either
            with self._lock:
                self._entries = [e for e in self._entries if e is not entry]
                self._changed.notify_all()
            del entry

    def drain(self) -> None:
        """Wait until every send has completed, all within one ``dualpipe.p2p_timeout_s``; raise the first failure."""
        engine = self._engine
        deadline = time.monotonic() + engine._timeout.total_seconds()
        if not self._background:
            with self._lock:
                entries, self._entries = self._entries, []
            for requests, peer, _ in entries:
                engine._wait_requests(requests, _what(requests), None, None, peer, deadline=deadline, source="by")
            return
        with self._lock:
            while self._entries and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    requests, peer, posted = self._entries[0]
                    self._entries = []
                    raise PeerTimeout.gave_up(engine, "the send did not complete", peer, _what(requests), "by",
                                              time.monotonic() - posted)
                self._changed.wait(left)
            failure, self._failure = self._failure, None
            if failure is not None:
                self._entries = []
                raise failure


__all__ = ["PendingSends"]
