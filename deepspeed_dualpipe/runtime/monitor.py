"""The plugin's figures in DeepSpeed's monitor, and the profile file ``advise`` reads.

With a DeepSpeed ``monitor`` enabled (``tensorboard``, ``csv_monitor``, ``wandb``, ``comet``), every
``dualpipe.monitor_interval``-th step is recorded on every rank (:func:`.profile.record_step`), the
ranks' figures are gathered, and global rank 0 (the rank DeepSpeed writes from) writes them through
``engine.monitor.write_events`` at DeepSpeed's sample count, named as DeepSpeed names its own
(``Train/Samples/train_loss``)::

    Train/Samples/pipe_bubble_measured            mean over pipeline ranks of 1 - compute / step time
    Train/Samples/pipe_bubble_measured_rank{r}    per pipeline rank r
    Train/Samples/pipe_bubble_simulated           the simulator on this schedule with the step's own costs
    Train/Samples/pipe_wait_ms[_rank{r}]          time waiting on peers' activations and gradients
    Train/Samples/pipe_overlap_hidden_ms[_rank{r}] all-to-all time hidden under the other micro-batch
    Train/Samples/pipe_peak_activation_bytes[_rank{r}]  (with dualpipe.monitor_memory; max over ranks)

Per pipeline rank a figure is the mean over its data-parallel replicas (memory: the largest).
Memory is read at the allocator (:class:`.memory.MemoryMeter`, :func:`.profile.step_meter`): on CUDA during the monitored
step, on CPU (torch's profiler slows a step) during the step after it.

``dualpipe.profile_step: N`` records step N (0-based) the same way, step N+1 for memory, and global
rank 0 writes ``dualpipe.profile_path``: the format is in docs/advise.md.
"""

import json
import os
import statistics
from typing import Dict, List, Optional

import torch
from deepspeed import comm as dist
from deepspeed.utils import logger

from deepspeed_dualpipe.runtime.profile import RankStep, record_step

PROFILE_FORMAT = "deepspeed-dualpipe-profile/1"


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _by_pipeline_rank(steps: List[RankStep], value, combine=statistics.fmean) -> Dict[int, float]:
    ranks: Dict[int, list] = {}
    for s in steps:
        v = value(s)
        if v is not None:
            ranks.setdefault(s.pipeline_rank, []).append(v)
    return {r: combine(v) for r, v in sorted(ranks.items())}


def mean_costs(steps: List[RankStep]) -> Dict[str, float]:
    """Mean seconds of each kind of computation over all ranks and chunks: F, B, I, W and the pairs
    FB (forward + full backward) and FI (forward + input part)."""
    durations: Dict[str, List[float]] = {}
    for s in steps:
        for key, values in s.compute.items():
            durations.setdefault(key.split(":")[0], []).extend(values)
    return {kind: statistics.fmean(v) for kind, v in durations.items() if v}


def simulated_bubble(steps: List[RankStep]) -> Optional[float]:
    """The mean bubble fraction the simulator gives this schedule with the step's measured costs."""
    from deepspeed_dualpipe.analysis.measured import simulator_costs
    from deepspeed_dualpipe.analysis.simulate import simulate
    costs = simulator_costs(mean_costs(steps))
    if costs is None:
        return None
    s = steps[0]
    result = simulate(s.schedule, s.stages, s.micro_batches, costs)
    return statistics.fmean(result.bubble) / result.makespan if result.makespan else None


def monitor_events(steps: List[RankStep], samples: int, memory: List[RankStep] = ()) -> List[tuple]:
    """DeepSpeed monitor events ``(name, value, samples)`` of one recorded step (every rank's RankStep)."""
    events = []

    def add(name, per_rank: Dict[int, float], overall):
        if not per_rank:
            return
        events.append((f"Train/Samples/{name}", overall(list(per_rank.values())), samples))
        events.extend((f"Train/Samples/{name}_rank{r}", v, samples) for r, v in per_rank.items())

    if steps:
        add("pipe_bubble_measured", _by_pipeline_rank(steps, lambda s: s.bubble), statistics.fmean)
        simulated = simulated_bubble(steps)
        if simulated is not None:
            events.append(("Train/Samples/pipe_bubble_simulated", simulated, samples))
        add("pipe_wait_ms", _by_pipeline_rank(steps, lambda s: 1e3 * s.waited_s), statistics.fmean)
        add("pipe_overlap_hidden_ms", _by_pipeline_rank(steps, lambda s: 1e3 * s.hidden_s), statistics.fmean)
    add("pipe_peak_activation_bytes", _by_pipeline_rank(memory, lambda s: s.activation_peak_bytes, max), max)
    return events


class StepFigures:
    """Decides which steps the engine records, and publishes what they show (see the module docstring)."""

    def __init__(self, engine, settings):
        self.engine = engine
        self.interval = settings.monitor_interval
        self.monitor_memory = settings.monitor_memory
        self.profile_step = settings.profile_step
        self.profile_path = settings.profile_path
        self._timed: Optional[List[RankStep]] = None  # the profile step's figures, until its memory step
        self._pending_memory = False  # on CPU: the monitor's memory figure is due in the next step

    def _monitoring(self) -> bool:
        monitor = getattr(self.engine, "monitor", None)
        return bool(monitor is not None and monitor.enabled)

    def train_batch(self, step: int, run):
        """Run ``run()`` (one train_batch, 0-based ``step``); record and publish it if it is due."""
        cuda = torch.device(self.engine.device).type == "cuda"
        monitor_due = self._monitoring() and step % self.interval == 0
        profile_due = step == self.profile_step
        profile_memory = self.profile_step is not None and step == self.profile_step + 1
        if cuda:  # the allocator's counters cost nothing: memory in the timed step itself
            monitor_memory = monitor_due and self.monitor_memory
            memory, timing = profile_memory or monitor_memory, monitor_due or profile_due
        else:  # torch's profiler slows a step down: memory in a step of its own, after the timed one
            memory = (profile_memory or self._pending_memory) and not profile_due
            timing = (monitor_due or profile_due) and not memory
            monitor_memory = memory and self._pending_memory
            self._pending_memory = (self._pending_memory and not memory) or (timing and monitor_due
                                                                             and self.monitor_memory)
        if not (memory or timing):
            return run()
        result, mine = record_step(self.engine, run, memory=memory)
        everyone = _gather(mine)
        if self.engine.global_rank == 0:
            events = monitor_events(everyone if timing and monitor_due else [], self.engine.global_samples,
                                    everyone if monitor_memory else [])
            if events:
                self.engine.monitor.write_events(events)
            if profile_due:
                self._timed = everyone
            if profile_memory and self._timed is not None:
                write_profile(self.profile_path, self._timed, everyone, self.profile_step)
                self._timed = None
        return result


def _rank_entry(s: RankStep, memory: Optional[RankStep]) -> dict:
    return {
        "global_rank": s.global_rank,
        "pipeline_rank": s.pipeline_rank,
        "data_parallel_rank": s.data_parallel_rank,
        "wall_s": s.wall_s,
        "step_s": s.step_s,
        "cpu_s": s.cpu_s,
        "process_cpu_s": s.process_cpu_s,
        "busy_s": s.busy_s,
        "waited_s": s.waited_s,
        "hidden_s": s.hidden_s,
        "compute_s": s.compute,
        "compute_cpu_s": s.compute_cpu,
        "a2a_s": s.a2a,
        "a2a_count": s.a2a_count,
        "p2p_s": s.p2p_s,
        "other_s": s.other_s,
        "other_cpu_s": s.other_cpu_s,
        "instructions": s.instructions,
        "parameter_bytes": s.parameter_bytes,
        "activation_peak_bytes": None if memory is None else memory.activation_peak_bytes,
        "memory_after_bytes": [] if memory is None else memory.memory_after_bytes,
    }


def write_profile(path: str, timed: List[RankStep], memory: List[RankStep], step: int) -> str:
    """The profile file (docs/advise.md): every rank's recorded step, and the next step's memory."""
    peaks = {s.global_rank: s for s in memory}
    first = timed[0]
    profile = dict(format=PROFILE_FORMAT,
                   schedule=first.schedule,
                   stages=first.stages,
                   micro_batches=first.micro_batches,
                   data_parallel=len({s.data_parallel_rank
                                      for s in timed}),
                   step=step,
                   memory_step=step + 1,
                   device=first.device,
                   cores=first.cores,
                   local_ranks=first.local_ranks)
    profile["ranks"] = [_rank_entry(s, peaks.get(s.global_rank)) for s in sorted(timed, key=lambda s: s.global_rank)]
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
    logger.info(f"deepspeed_dualpipe: wrote the profile of step {step} to {path}")
    return path


__all__ = ["StepFigures", "monitor_events", "write_profile", "mean_costs", "simulated_bubble", "PROFILE_FORMAT"]
