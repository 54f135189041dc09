"""Strict mode's second half: the order of operations across communicators, as NCCL needs it (an emulation on gloo).

NCCL runs each communicator's operations in issue order on a stream of its own, and a collective (or a send and
its receive) is a rendezvous of the communicator's ranks. Two ranks that share communicators A and B must
therefore issue their operations on A and B in one order: if rank x issues A#i before B#j and rank y issues B#j
before A#i, each can end up waiting inside one for the other (for sure with ``CUDA_DEVICE_MAX_CONNECTIONS=1``,
or whenever the host waits on one before issuing the other). gloo runs every group on threads of its own and
hides it. The rule checked here is that issue order, whatever the waits: stricter than NCCL, never looser.

How (every rank, no extra collective):

- a *stream* is one communicator's in-order queue: a process group's collectives (``c:<group name>:<members>``),
  or the point-to-point messages from one rank to another (``p:<src>><dst>``; the pair's communicator holds both
  directions, whose order among themselves :mod:`.strict_p2p` checks);
- when a rank issues an operation it publishes, in the job's store, how many operations it had issued on every
  other stream so far (its *snapshot*); two ranks agree on the order iff, for every operation both issue, their
  snapshots agree on every stream of every other communicator they share. The second of the two to publish
  compares and raises :class:`StrictOrderError` naming both ranks, both communicators and both operations;
- a rank that would block in a collective (a synchronous one, or ``wait()`` on an asynchronous one) first waits
  in the store until every member has issued it and compared its order with everyone's, so no rank goes into
  the real (gloo) collective while another has found a crossed order: whoever finds one publishes it, and every
  rank waiting in a collective stops with it. While it waits it also reads each missing member's latest counts:
  a member that has issued, on a communicator they share, an operation this rank has not, while this rank has
  issued the awaited one, is a crossed order, reported at once instead of a hang. Anything else stuck is
  reported after the strict timeout with what each missing member issued last.

Cost: per operation two ``set`` calls of a short string and a ``check``/``get`` per other member, per collective a
second round (``compared``), and polling only while a rank is early at a collective (it would wait there anyway):
the MoE run's ten schedules take 44 s instead of 41 s. Collectives are intercepted at the
``torch.distributed`` functions, which DeepSpeed's ``deepspeed.comm`` and models' own code (Megatron's
tensor-parallel mappings) both call through the module; point-to-point comes from :mod:`.strict_p2p`.
What it does not emulate: CUDA streams, NCCL's buffering, a real NCCL hang (the watchdog).
"""

import functools
import inspect
import json
import threading
import time

import torch.distributed as torch_dist

COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
               "all_gather_coalesced", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
               "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "scatter", "barrier",
               "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list")
_POLL_S = (0.0005, 0.005)  # first and longest sleep while waiting for a communicator's members


class StrictOrderError(RuntimeError):
    """Two ranks issue their operations on two communicators they share in different orders (NCCL may hang)."""


def _members(stream: str):
    if stream.startswith("p:"):
        return tuple(sorted(int(r) for r in stream[2:].split(">")))
    return tuple(int(r) for r in stream.rsplit(":", 1)[1].split(","))


def _communicator(stream: str) -> str:
    """A p2p stream belongs to its pair's communicator (both directions); a collective stream is its own."""
    return "p:{}-{}".format(*_members(stream)) if stream.startswith("p:") else stream


def describe(stream: str) -> str:
    members = ", ".join(map(str, _members(stream)))
    if stream.startswith("p:"):
        return f"the point-to-point communicator of ranks [{members}]"
    return f"communicator [{members}] (process group {stream.split(':')[1]})"


class OrderCheck:
    """This rank's streams, snapshots and the checks above (the module's docstring)."""

    def __init__(self, store, rank: int, timeout_s: float, error=StrictOrderError):
        self.store, self.rank, self.timeout_s, self.error = store, rank, float(timeout_s), error
        self.counts = {}  # stream -> operations issued on it
        self.kinds = {}  # (stream, index) -> what it was, for messages
        self.snapshots = {}  # (stream, index) -> counts before it, until this rank has met the others there
        self.lock = threading.Lock()
        self.epoch = 0

    def reset(self) -> None:
        """Forget everything issued so far (tests that run unrelated cases one after another; every rank at the
        same point): later keys live under a new epoch."""
        with self.lock:
            self.counts, self.kinds, self.snapshots = {}, {}, {}
            self.epoch += 1

    # ----- issuing ------------------------------------------------------------------------------
    def issue(self, ops, blocking: bool = False) -> list:
        """Record one group of operations issued together, ``[(stream, kind), ...]``; returns their (stream, index).
        Raises if another rank already issued one of them in a different order. ``blocking``: the rank will
        :meth:`arrive` at them (a collective)."""
        with self.lock:
            before = dict(self.counts)
            issued = []
            for stream, kind in ops:
                index = self.counts.get(stream, 0)
                self.counts[stream] = index + 1
                self.kinds[stream, index] = kind
                if blocking:
                    self.snapshots[stream, index] = before
                issued.append((stream, index))
            for stream, index in issued:
                self.store.set(self._key(stream, index, self.rank),
                               json.dumps({
                                   "kind": self.kinds[stream, index],
                                   "counts": before
                               }))
            self.store.set(self._latest(self.rank), json.dumps({"counts": self.counts, "last": issued[-1]}))
        for stream, index in issued:
            for peer in _members(stream):
                key = self._key(stream, index, peer)
                if peer != self.rank and self.store.check([key]):
                    self._guarded(self._compare, stream, index, before, peer,
                                  json.loads(self.store.get(key))["counts"])
        return issued

    def _compare(self, stream, index, mine, peer, theirs) -> None:
        """Both issued ``stream``#``index``: every other shared stream must hold as many operations before it."""
        here = _communicator(stream)
        for other in sorted(set(mine) | set(theirs)):
            if _communicator(other) == here or not {self.rank, peer} <= set(_members(other)):
                continue
            a, b = mine.get(other, 0), theirs.get(other, 0)
            if a != b:
                first, second = (self.rank, peer) if a > b else (peer, self.rank)
                self._raise(first, second, (other, min(a, b)), (stream, index))

    def _raise(self, first, second, early, late):
        """``first`` issued ``early`` before ``late``; ``second`` issued ``late`` before ``early``."""
        names = {op: f"{self._name(*op)} on {describe(op[0])}" for op in (early, late)}
        raise self.error(
            f"ranks {min(first, second)} and {max(first, second)} issue their operations on two communicators they "
            f"share in different orders: rank {first} issued {names[early]} before {names[late]}; rank {second} "
            f"issued {names[late]} first; NCCL runs each communicator in order on its own stream, so this can "
            f"deadlock there (strict mode, the NCCL emulation)")

    def _name(self, stream, index) -> str:
        kind = self.kinds.get((stream, index))
        if kind is None:
            for peer in _members(stream):
                key = self._key(stream, index, peer)
                if self.store.check([key]):
                    kind = json.loads(self.store.get(key))["kind"]
                    break
        return f"{kind or 'operation'} #{index}"

    # ----- blocking -----------------------------------------------------------------------------
    def arrive(self, stream: str, index: int) -> None:
        """Before this rank blocks in ``stream``#``index``: wait until every member has issued it and compared its
        order with everyone's (so that no member goes into the real collective while another has found a crossed
        order), raising on a crossed order (who waits for whom) or after the timeout."""
        mine = self.snapshots.pop((stream, index), None)
        if mine is None:
            return  # met already (a second wait() on the same request)
        others = [p for p in _members(stream) if p != self.rank]
        deadline = time.monotonic() + self.timeout_s
        missing = list(others)
        for phase in ("issued", "compared"):
            sleep = _POLL_S[0]
            while missing:
                self._check_broken()
                for peer in [p for p in missing if self.store.check([self._key(stream, index, p, phase)])]:
                    if phase == "issued":
                        theirs = json.loads(self.store.get(self._key(stream, index, peer)))["counts"]
                        self._guarded(self._compare, stream, index, mine, peer, theirs)
                    missing.remove(peer)
                if not missing:
                    break
                if phase == "issued":
                    for peer in missing:
                        self._guarded(self._crossed_while_waiting, stream, index, peer)
                if time.monotonic() > deadline:
                    last = "; ".join(f"rank {p} last issued {self._last(p)}" for p in missing)
                    raise self.error(f"rank {self.rank} waited {self.timeout_s:g} s in {self.kinds[stream, index]} "
                                     f"#{index} on {describe(stream)} for ranks {missing}: {last} (strict mode, the "
                                     f"NCCL emulation)")
                time.sleep(sleep)
                sleep = min(2 * sleep, _POLL_S[1])
            if phase == "issued":
                self.store.set(self._key(stream, index, self.rank, "compared"), "1")
                missing = list(others)

    def _guarded(self, check, *args):
        """Run a check; a crossed order it finds is published first, so that every waiting rank stops too."""
        try:
            check(*args)
        except self.error as error:
            self.store.set(self._broken(), f"rank {self.rank}: {error}")
            raise

    def _check_broken(self) -> None:
        if self.store.check([self._broken()]):
            raise self.error(f"rank {self.rank} stops: another rank found a crossed order, "
                             f"{self.store.get(self._broken()).decode()}")

    def _crossed_while_waiting(self, stream, index, peer) -> None:
        if not self.store.check([self._latest(peer)]):
            return
        theirs = json.loads(self.store.get(self._latest(peer)))["counts"]
        if theirs.get(stream, 0) > index:
            return  # it has issued this one meanwhile
        here = _communicator(stream)
        with self.lock:
            mine = dict(self.counts)
        for other, count in sorted(theirs.items()):
            if _communicator(other) != here and self.rank in _members(other) and count > mine.get(other, 0):
                # peer: other#mine before stream#index; this rank: stream#index first (it blocks there)
                self._raise(self.rank, peer, (stream, index), (other, mine.get(other, 0)))

    def _last(self, peer) -> str:
        if not self.store.check([self._latest(peer)]):
            return "nothing since strict mode was installed"
        stream, index = json.loads(self.store.get(self._latest(peer)))["last"]
        return f"{self._name(stream, index)} on {describe(stream)}"

    def _key(self, stream, index, rank, what="issued") -> str:
        return f"{self.epoch}/{what}/{stream}/{index}/{rank}"

    def _broken(self) -> str:
        return f"{self.epoch}/broken"

    def _latest(self, rank) -> str:
        return f"{self.epoch}/latest/{rank}"


class _Work:
    """An asynchronous collective's request: ``wait()`` first meets the other members in the store."""

    def __init__(self, work, check, stream, index):
        self._work, self._check, self._at = work, check, (stream, index)

    def wait(self, *args, **kwargs):
        self._check.arrive(*self._at)
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


class Collectives:
    """The ``torch.distributed`` collectives of this process, each recorded on its communicator's stream."""

    def __init__(self, check: OrderCheck):
        self.check, self.saved, self.streams = check, {}, {}

    def stream(self, group) -> str:
        group = torch_dist.group.WORLD if group is None else group
        key = id(group)
        if key not in self.streams:
            ranks = torch_dist.get_process_group_ranks(group)
            self.streams[key] = (group, f"c:{group.group_name}:{','.join(map(str, ranks))}")
        return self.streams[key][1]

    def wrap(self, name, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def collective(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            group = bound.get("group")
            if group is torch_dist.GroupMember.NON_GROUP_MEMBER:
                return original(*args, **kwargs)  # a no-op on a rank outside the group
            stream = self.stream(group)
            (_, index), = self.check.issue([(stream, name)], blocking=True)
            if bound.get("async_op"):
                work = original(*args, **kwargs)
                return None if work is None else _Work(work, self.check, stream, index)
            self.check.arrive(stream, index)
            return original(*args, **kwargs)

        return collective

    def install(self) -> None:
        for name in COLLECTIVES:
            if hasattr(torch_dist, name):
                self.saved[name] = getattr(torch_dist, name)
                setattr(torch_dist, name, self.wrap(name, self.saved[name]))

    def uninstall(self) -> None:
        for name, original in self.saved.items():
            setattr(torch_dist, name, original)
        self.saved = {}


def p2p_streams(rank: int, ops) -> list:
    """The streams and kinds of one posted point-to-point group (``ops``: (kind "send"/"recv", peer))."""
    return [(f"p:{rank}>{peer}" if kind == "send" else f"p:{peer}>{rank}", kind) for kind, peer in ops]


__all__ = ["StrictOrderError", "OrderCheck", "Collectives", "p2p_streams", "describe", "COLLECTIVES"]
