"""Independent oracle for the per-rank compute order of DeepSeek's DualPipe.

This models only the *compute* calls made by ``DualPipe.step`` in
``dualpipe/dualpipe.py`` and ``DualPipeV.step`` in ``dualpipe/dualpipev.py`` of
https://github.com/deepseek-ai/DualPipe (MIT licence; nothing is copied, the
logic was re-derived from reading it). Communication is ignored.

Both ``step`` methods run the same eight loops over four primitives:
forward(phase), backward(phase, zero_bubble), overlapped pair(f_phase, b_phase)
and weight() (pop the OLDEST deferred weight-grad, FIFO). Their loop counts are
the same formulas in three numbers ``(ranks, pos, chunks)``:

* DualPipe:  ``(P // 2, min(r, P - 1 - r), M // 2)``
* DualPipeV: ``(P, r, M)``

and the rank whose first step-4 iteration is split into a lone forward and a
lone full backward (DualPipe's two middle ranks, DualPipeV's last rank) is in
both cases the one with ``pos == ranks - 1``.

Op dicts: F / B (full backward) / I (input grads only) / W (deferred weight
grad, labelled with the chunk and micro_batch of its I) / FB (overlapped pair).
"""

from collections import deque

SCHEDULES = ("dualpipe", "dualpipev")


def _validate(schedule, stages, micro_batches, rank):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, value in (("stages", stages), ("micro_batches", micro_batches), ("rank", rank)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if stages < 1 or (schedule == "dualpipe" and (stages < 2 or stages % 2)):
        raise ValueError(f"{schedule} cannot run on {stages} stages")
    if schedule == "dualpipe" and micro_batches % 2:
        raise ValueError("dualpipe needs an even number of micro-batches")
    if micro_batches < 2 * stages:
        raise ValueError(f"need at least {2 * stages} micro-batches, got {micro_batches}")
    if not 0 <= rank < stages:
        raise ValueError(f"rank {rank} is outside 0..{stages - 1}")


class _Rank:
    """Replays the compute primitives of one rank and records the ops."""

    def __init__(self, label):
        self.label = label  # step phase -> (chunk, micro_batch of the k-th use)
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.queue = deque()  # (chunk, micro_batch) awaiting its W
        self.ops = []

    def _take(self, counters, phase):
        k = counters[phase]
        counters[phase] += 1
        chunk, micro_batch = self.label(phase, k)
        return {"chunk": chunk, "micro_batch": micro_batch}

    def forward(self, phase, record=True):
        op = {"op": "F", **self._take(self.next_f, phase)}
        if record:
            self.ops.append(op)
        return op

    def backward(self, phase, zero_bubble=False, record=True):
        op = {"op": "I" if zero_bubble else "B", **self._take(self.next_b, phase)}
        if zero_bubble:
            self.queue.append((op["chunk"], op["micro_batch"]))
        if record:
            self.ops.append(op)
        return op

    def pair(self, f_phase, b_phase):
        fwd = self.forward(f_phase, record=False)
        bwd = self.backward(b_phase, record=False)
        self.ops.append({"op": "FB", "forward": fwd, "backward": bwd})

    def weight(self):
        if not self.queue:
            raise RuntimeError("weight() with no deferred weight gradient queued")
        chunk, micro_batch = self.queue.popleft()
        self.ops.append({"op": "W", "chunk": chunk, "micro_batch": micro_batch})


def _run_eight_steps(rank, ranks, pos, chunks):
    """The eight loops shared by DualPipe.step and DualPipeV.step (compute only)."""
    tail = ranks - pos - 1  # step 3, 5 and 7 count; step 1 is twice this
    head = pos + 1  # step 2, 6 and 8 count
    for _ in range(2 * tail):  # 1: forwards of phase 0
        rank.forward(0)
    for _ in range(head):  # 2: alternate phase-0 / phase-1 forwards
        rank.forward(0)
        rank.forward(1)
    for _ in range(tail):  # 3: zero-bubble backward, its weight, a forward
        rank.backward(1, zero_bubble=True)
        rank.weight()
        rank.forward(1)
    for i in range(chunks - 2 * ranks + pos + 1):  # 4: steady state
        if i == 0 and pos == ranks - 1:
            rank.forward(0)  # not overlapped on this rank
            rank.backward(1)
        else:
            rank.pair(0, 1)
        rank.pair(1, 0)
    for _ in range(tail):  # 5
        rank.backward(1)
        rank.pair(1, 0)
    _step_six(rank, pos)
    for _ in range(tail):  # 7
        rank.weight()
        rank.backward(0, zero_bubble=True)
    for _ in range(head):  # 8: drain the queue
        rank.weight()


def _step_six(rank, pos):
    """Backward pairs; zero bubble switches on halfway, at B1 (odd pos) or B0 (even)."""
    count = pos + 1
    zero_bubble = False
    for i in range(count):
        if i == count // 2 and pos % 2 == 1:
            zero_bubble = True
        rank.backward(1, zero_bubble=zero_bubble)
        if i == count // 2 and pos % 2 == 0:
            zero_bubble = True
        rank.backward(0, zero_bubble=zero_bubble)


def _simulate(schedule, stages, micro_batches, rank):
    _validate(schedule, stages, micro_batches, rank)
    if schedule == "dualpipe":
        flip = int(rank >= stages // 2)  # second half sees the phases swapped
        half = micro_batches // 2

        def label(phase, k):
            actual = phase ^ flip
            return actual, k + actual * half

        state = _Rank(label)
        _run_eight_steps(state, stages // 2, min(rank, stages - 1 - rank), half)
    else:
        state = _Rank(lambda phase, k: (phase, k))
        _run_eight_steps(state, stages, rank, micro_batches)
    return state


def reference_compute_order(schedule: str, stages: int, micro_batches: int, rank: int) -> list:
    """Compute ops of ``rank`` in the order the DeepSeek reference executes them."""
    return _simulate(schedule, stages, micro_batches, rank).ops


def _flatten(ops):
    for op in ops:
        if op["op"] == "FB":
            yield op["forward"]
            yield op["backward"]
        else:
            yield op


def _check_rank(schedule, stages, micro_batches, rank):
    where = f"{schedule} P={stages} M={micro_batches} rank={rank}"
    state = _simulate(schedule, stages, micro_batches, rank)
    assert not state.queue, f"{where}: weight-grad queue not empty at the end"
    per_chunk = micro_batches // 2 if schedule == "dualpipe" else micro_batches
    first = {0: 0, 1: per_chunk if schedule == "dualpipe" else 0}
    owned = {(c, first[c] + k) for c in (0, 1) for k in range(per_chunk)}
    seen = {kind: {} for kind in "FBIW"}
    for index, op in enumerate(_flatten(state.ops)):
        key = (op["chunk"], op["micro_batch"])
        assert key in owned, f"{where}: {op} is not owned by this rank"
        assert key not in seen[op["op"]], f"{where}: {op} repeated"
        seen[op["op"]][key] = index
    for key in owned:
        f_at = seen["F"].get(key)
        assert f_at is not None, f"{where}: no forward for {key}"
        full, split, weight = (seen[k].get(key) for k in "BIW")
        assert (full is None) != (split is None), f"{where}: need exactly one of B or I for {key}"
        assert (split is None) == (weight is None), f"{where}: I and W must pair up for {key}"
        assert f_at < (full if full is not None else split), f"{where}: backward before F {key}"
        assert split is None or split < weight, f"{where}: W before its I for {key}"


def check_oracle_invariants(max_stages=16, extra_micro_batches=6):
    """Every valid (P, M) with M in 2P..2P+extra: each rank does one F and one
    backward (B, or I then a later W) per owned (chunk, micro_batch)."""
    checked = 0
    for schedule in SCHEDULES:
        for stages in range(1, max_stages + 1):
            if schedule == "dualpipe" and stages % 2:
                continue
            for micro_batches in range(2 * stages, 2 * stages + extra_micro_batches + 1):
                if schedule == "dualpipe" and micro_batches % 2:
                    continue
                for rank in range(stages):
                    _check_rank(schedule, stages, micro_batches, rank)
                    checked += 1
    return checked


if __name__ == "__main__":
    print("ranks checked:", check_oracle_invariants())
