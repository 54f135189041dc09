"""Start gloo ranks on this machine, run one function in each, and return their results by rank.

The tests and the bench use it; jobs use DeepSpeed's own launcher. It never hangs its caller: a
rank that raises, exits without a result, or outlives ``timeout`` is reported by number, and
every rank is killed before it returns. DeepSpeed's leaked shared-memory buffers are removed.
"""

import os
import pickle
import queue
import socket
import sys
import time
import traceback

import torch

from deepspeed_dualpipe.testing.shm import release_shared_memory
from deepspeed_dualpipe.testing.strict_p2p import ENV as STRICT_P2P_ENV, install_from_env


class RankFailure(AssertionError):
    """A rank raised, exited without a result, or did not finish in time. (An AssertionError, so a
    test that launches ranks fails, rather than errors, when one of them does.)"""


def free_port() -> int:
    """An unused TCP port: a fresh one per launch avoids "address in use" from a TCPStore in TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
        # Few cores, several ranks: more threads per rank only oversubscribe them.
        "OMP_NUM_THREADS": "1"
    }


def _worker(rank, env, fn, args, results):
    os.environ.update(env)  # inherited at spawn time as well; set again for safety
    sys.stdout = sys.stderr  # the ranks' chatter (DeepSpeed prints) must not mix with the caller's output
    try:
        torch.set_num_threads(1)
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        install_from_env()  # strict mode (NCCL's point-to-point rules) when the caller asked for it
        result = fn(*args)
        pickle.dumps(result)  # fail here (reported) rather than in the queue's feeder thread (silent)
        results.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown must not turn a result into a failure
        pass


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0, dies=(), strict_p2p=None):
    """``[fn(*args) on rank r for r in range(world_size)]``, each rank in its own spawned process.

    ``fn`` and ``args`` must be picklable. ``strict_p2p`` (seconds) runs the ranks in strict mode, NCCL's
    point-to-point rules emulated on gloo (:mod:`.strict_p2p`), with that timeout. Ranks listed in ``dies`` are expected to exit without a
    result (a test that kills them); then ``(results of the others by rank, exit codes of those)``
    is returned instead. Raises :class:`RankFailure` naming the rank that failed or hung.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    results, port, procs = ctx.Queue(), free_port(), []
    saved = dict(os.environ)
    try:
        for rank in range(world_size):
            env = rank_env(rank, world_size, port)
            env[STRICT_P2P_ENV] = "" if strict_p2p is None else str(strict_p2p)
            os.environ.update(env)  # spawned children copy os.environ before they import torch
            procs.append(ctx.Process(target=_worker, args=(rank, env, fn, args, results), daemon=True))
            procs[-1].start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    survivors = set(range(world_size)) - set(dies)
    done, deadline = {}, time.monotonic() + timeout
    try:
        while set(done) != survivors:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailure(f"ranks {sorted(survivors - set(done))} did not finish in {timeout:g} s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                # A rank that died without reporting (segfault, os._exit) would otherwise cost the whole
                # timeout. A rank flushes its result before it exits: one last short look, then give up.
                lost = [r for r in sorted(survivors - set(done)) if not procs[r].is_alive()]
                if not lost:
                    continue
                try:
                    rank, status, payload = results.get(timeout=2.0)
                except queue.Empty:
                    raise RankFailure(", ".join(f"rank {r} exited with code {procs[r].exitcode} without a result"
                                                for r in lost)) from None
            if rank not in survivors:
                raise RankFailure(f"rank {rank} was expected to die but reported {status}: {payload}")
            if status != "ok":
                raise RankFailure(f"rank {rank} raised:\n{payload}")
            done[rank] = payload
        for p in procs:  # results are in: let the ranks tear down, but never wait long
            p.join(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        release_shared_memory(port)
    if dies:
        return done, {r: procs[r].exitcode for r in dies}
    return [done[r] for r in range(world_size)]
