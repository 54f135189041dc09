"""Every schedule predicted from a :class:`~.costs.ModelCosts`: the simulator with per-chunk costs, the serial
work besides, the CPU bound where ranks share cores, and the recommendation."""

import statistics
from dataclasses import dataclass
from typing import List, Optional, Sequence

from deepspeed_dualpipe.analysis.simulate import simulate
from deepspeed_dualpipe.analysis.symbolic import Costs
from deepspeed_dualpipe.schedule import PAIRED_SCHEDULES, get_spec
from deepspeed_dualpipe.tools.advise.costs import ModelCosts
from deepspeed_dualpipe.tools.advise.memory import live_after_each_instruction

TIE = 0.01  # predictions this close (relative) are equally fast


@dataclass
class Prediction:
    schedule: str
    micro_batches: int
    step_s: float
    bubble: float  # mean over ranks, fraction of the simulated schedule
    activation_bytes: Optional[int]  # peak per rank
    parameter_bytes: int  # per rank
    costs: Costs

    @property
    def per_micro_batch_s(self) -> float:
        return self.step_s / self.micro_batches

    def memory_bytes(self) -> Optional[int]:
        return None if self.activation_bytes is None else self.activation_bytes + self.parameter_bytes


def instructions(schedule: str, P: int, M: int) -> float:
    """Instructions per rank of a step (the mean over ranks)."""
    from deepspeed_dualpipe.schedule import rank_steps
    return statistics.fmean(sum(len(step) for step in steps) for steps in rank_steps(schedule, P, M))


def backward_s(m: ModelCosts, schedule: str) -> float:
    """One micro-batch's backward through the model as ``schedule`` runs it: split (I + W) or whole (B)."""
    return m.backward_s if get_spec(schedule).split_backward else m.full_backward_s


def _compute_work(m: ModelCosts) -> float:
    """CPU seconds of computing in the profiled step, over one data-parallel replica's pipeline."""
    return m.micro_batches * (m.forward_s + backward_s(m, m.schedule))


def chunk_costs(m: ModelCosts, schedule: str, P: int) -> Costs:
    """The simulator's per-chunk costs of ``schedule`` on ``P`` ranks (seconds)."""
    K = get_spec(schedule).layout(P, 2 * P).model_stages
    F, B, W = m.forward_s / K, backward_s(m, schedule) / K, m.weight_s / K
    pair = None
    if m.clock == "wall" and schedule in PAIRED_SCHEDULES and m.moe_layers and m.a2a_per_call_s:
        # The engine interleaves a pair's two micro-batches at their all-to-alls: replay that with these costs.
        # (Timed in CPU seconds, an all-to-all is no work of the computing thread: nothing to hide.)
        from deepspeed_dualpipe.tools.bench.predict import overlapped_pair
        layers = max(1, round(m.moe_layers / K))
        compute_f = max(F - m.a2a_forward_s / K, 0.0) / layers
        compute_b = max(B - m.a2a_backward_s / K, 0.0) / layers
        pair = overlapped_pair(layers, compute_f, compute_b, m.a2a_per_call_s)
    return Costs(F=F, B=B, W=min(W, B), FB=pair)


def stage_units(m: ModelCosts, K: int) -> List[float]:
    """Bytes per live micro-batch of each of ``K`` model stages, from the profiled cut's (by overlap of layer
    ranges: a stage of a coarser cut holds the finer cut's stages it covers)."""
    fine = m.stage_activation_bytes
    K0 = len(fine)
    out = []
    for t in range(K):
        lo, hi = t / K, (t + 1) / K
        out.append(sum(u * max(0.0, min(hi, (s + 1) / K0) - max(lo, s / K0)) * K0 for s, u in enumerate(fine)))
    return out


def peak_activation_bytes(m: ModelCosts, schedule: str, P: int, M: int) -> Optional[int]:
    """The largest rank's bytes at any instruction end of ``schedule``, with each stage's bytes per live
    micro-batch, plus the profiled base and transient."""
    if not m.stage_activation_bytes:
        return None
    layout = get_spec(schedule).layout(P, M)
    units = stage_units(m, layout.model_stages)
    peaks = []
    for r in range(P):
        per_chunk = [units[layout.model_stage(r, c)] for c in range(layout.chunks_per_rank)]
        live = live_after_each_instruction(schedule, P, M, r)
        peaks.append(max(sum(u * n for u, n in zip(per_chunk, counts)) for counts in live))
    return int(m.memory_base_bytes + m.memory_transient_bytes + max(peaks))


def predict(m: ModelCosts, schedule: str, P: int, M: int) -> Prediction:
    """Step time, bubble and memory of ``schedule`` on ``P`` ranks with ``M`` micro-batches.

    The step is the simulated schedule plus each rank's serial work (its part that grows with M scaled, the
    reductions and optimizer scaled with the parameters a rank holds). On CPU it is at least all ranks' work
    over the cores they got in the profiled step: ranks that share cores cannot all compute at once."""
    spec = get_spec(schedule)
    spec.validate(P, M)
    layout = spec.layout(P, M)
    profiled = get_spec(m.schedule).layout(m.stages, m.micro_batches)
    costs = chunk_costs(m, schedule, P)
    sim = simulate(schedule, P, M, costs)
    # Serial work besides computing grows with the instructions a rank runs (posting, loading, the engine's
    # own work per instruction); reductions and the optimizer step with the parameters it holds.
    grows = instructions(schedule, P, M) / instructions(m.schedule, m.stages, m.micro_batches)
    params = layout.param_copies / profiled.param_copies
    serial = m.serial_fixed_s * params + (m.serial_s - m.serial_fixed_s) * grows
    step = sim.makespan + serial
    if m.clock == "cpu" and m.effective_cores:
        compute = m.data_parallel * P * sum(i.end - i.start for t in sim.execution.timelines for i in t) / P
        profiled_compute = m.data_parallel * _compute_work(m)
        other = m.work_s - m.work_fixed_s - profiled_compute
        work = m.work_fixed_s * params + other * grows + compute
        step = max(step, work / m.effective_cores)
    activation = peak_activation_bytes(m, schedule, P, M)
    bubble = statistics.fmean(sim.bubble) / sim.makespan if sim.makespan else 0.0
    per_rank_params = m.parameter_bytes * layout.param_copies / P
    return Prediction(schedule, M, step, bubble, activation, int(per_rank_params), costs)


def micro_batch_range(P: int, profiled: int) -> List[int]:
    return sorted({P, 2 * P, 3 * P, 4 * P, 6 * P, 8 * P, profiled})


def predict_all(m: ModelCosts, schedules: Sequence[str], micro_batches: Sequence[int]) -> List[Prediction]:
    out = []
    for name in schedules:
        for M in micro_batches:
            try:
                out.append(predict(m, name, m.stages, M))
            except ValueError:
                continue  # a shape this schedule does not run
    return out


def recommend(predictions: List[Prediction], budget: Optional[int]) -> Optional[Prediction]:
    """The most micro-batches per second among the predictions whose memory fits ``budget`` (bytes)."""
    fits = [p for p in predictions if budget is None or (p.memory_bytes() or p.parameter_bytes) <= budget]
    if not fits:
        return None
    best = min(p.per_micro_batch_s for p in fits)
    # Predictions within 1% are a tie (the model is not that precise): the least memory wins it.
    tied = [p for p in fits if p.per_micro_batch_s <= best * (1 + TIE)]
    return min(tied, key=lambda p: (p.memory_bytes() or p.parameter_bytes, p.per_micro_batch_s))


# ----- measured runs beside the predictions (docs/advise.md) ------------------------------------------------------
