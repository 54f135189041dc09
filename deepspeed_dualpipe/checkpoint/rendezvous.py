"""The waits of one save: through the job's rendezvous store with heartbeats, never collectives, so
a dead rank fails the save on the others instead of hanging them."""

import itertools
import threading
import time

from deepspeed_dualpipe.checkpoint.files import CheckpointError, read_latest, staging_dir

_SAVES = itertools.count()  # per process; every rank saves the same sequence of checkpoints


class SaveRendezvous:
    """Barriers of one save through the job's rendezvous store, with heartbeats, never through collectives."""

    def __init__(self, engine, save_dir, tag, timeout_s):
        import torch.distributed as tdist
        from torch.distributed import distributed_c10d
        self.engine, self.save_dir, self.tag, self.timeout = engine, save_dir, tag, float(timeout_s)
        self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        base = distributed_c10d._get_default_store()
        prefix = f"dualpipe_checkpoint/{next(_SAVES)}/"
        self.store = tdist.PrefixStore(prefix, base)
        try:
            beat_store = tdist.PrefixStore(prefix, base.clone())  # its own connection for the heartbeat thread
        except Exception:  # noqa: BLE001 - a store without clone(): share the connection (it is locked)
            beat_store = self.store
        self._beat_store, self._stop = beat_store, threading.Event()
        self._beat_interval = max(0.05, min(1.0, self.timeout / 8))
        self._seen = {}  # rank -> (last heartbeat count, time.monotonic() it changed)
        self._thread = threading.Thread(target=self._beat, name="dualpipe-checkpoint-heartbeat", daemon=True)

    def __enter__(self):
        self._store_op(lambda: self.store.add(f"beat/{self.rank}", 1))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False

    def _beat(self):
        while not self._stop.wait(self._beat_interval):
            try:
                self._beat_store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the main thread reports it
                return

    # -- messages ------------------------------------------------------------------------------
    def who(self) -> str:
        stage = getattr(self.engine, "stage_id", None)
        return f"global rank {self.rank}" + (f" (pipeline rank {stage})" if stage is not None else "")

    def not_saved(self, reason: str) -> CheckpointError:
        latest = read_latest(self.save_dir)
        previous = (f"'latest' still names {latest!r}, which is complete and loads"
                    if latest is not None else "there is no 'latest' file in it")
        return CheckpointError(f"{self.who()}: checkpoint {self.tag!r} in {self.save_dir} was not saved: {reason}. "
                               f"Nothing was committed: {previous}. Partial files may remain in "
                               f"{staging_dir(self.save_dir, self.tag)}; the next save_checkpoint removes them.")

    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks this one failed, so they stop waiting for it at once."""
        self._report(f"global rank {self.rank} raised {type(error).__name__}: {error}; the other ranks stopped "
                     f"waiting for it")

    def _report(self, reason: str) -> None:
        try:
            self.store.set("failed", reason)
        except Exception:  # noqa: BLE001 - the store is gone too: the others time out on our heartbeat
            pass

    # -- waiting ------------------------------------------------------------------------------
    def _store_op(self, op):
        try:
            return op()
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - the store's host (global rank 0 or the launcher) is gone
            raise self.not_saved(f"the rendezvous store of the job failed ({type(error).__name__}: {error}); its "
                                 f"host, usually global rank 0 or the launcher, probably died") from error

    def _stale_ranks(self):
        """Ranks whose heartbeat has not moved for the timeout. Rank 0 watches every rank (and tells the
        others); the others watch rank 0, which hosts the commit."""
        now, stale = time.monotonic(), []
        for r in (range(self.world) if self.rank == 0 else [0]):
            count = int(self.store.add(f"beat/{r}", 0))  # 0 until that rank's first beat; never blocks
            last = self._seen.get(r)
            if last is None or last[0] != count:
                self._seen[r] = (count, now)  # alive (or first looked at) now
            if now - self._seen[r][1] > self.timeout:
                stale.append((r, count))
        return stale

    def barrier(self, phase: str, what: str) -> None:
        """Wait until every rank has reached ``phase``; ``what`` is what the others wait for ("finish writing")."""
        self._store_op(lambda: self.store.add(f"{phase}/arrived", 1))
        pause, next_look = 0.005, 0.0
        while True:
            arrived = int(self._store_op(lambda: self.store.add(f"{phase}/arrived", 0)))
            if arrived >= self.world:
                return
            if self._store_op(lambda: self.store.check(["failed"])):
                raise self.not_saved(self._store_op(lambda: self.store.get("failed")).decode())
            stale = None
            if time.monotonic() >= next_look:  # heartbeats move once per interval: look no more often
                stale, next_look = self._store_op(self._stale_ranks), time.monotonic() + self._beat_interval
            if stale:
                names = ", ".join(f"global rank {r}" + ("" if count else " (it never started the save)")
                                  for r, count in stale)
                reason = (f"{names} showed no sign of life for {self.timeout:g} s (dualpipe.p2p_timeout_s) while "
                          f"{arrived} of {self.world} ranks waited for every rank to {what}; it probably died (check "
                          f"its log for the first error), is stuck, or did not call save_checkpoint")
                if self.rank == 0:
                    self._report(reason + " (noticed by global rank 0)")
                raise self.not_saved(reason)
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)

    # -- tag ------------------------------------------------------------------------------------
    def agree_on_tag(self) -> None:
        if self.rank == 0:
            self._store_op(lambda: self.store.set("tag", self.tag))

    def check_tag(self) -> None:
        first = self._store_op(lambda: self.store.get("tag")).decode()
        if first != self.tag:
            raise ValueError(f"save_checkpoint was called with tag {self.tag!r} on global rank {self.rank} but "
                             f"{first!r} on global rank 0; every rank must pass the same tag")
