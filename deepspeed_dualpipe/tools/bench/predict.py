"""The simulator's figures for the bench's layers.

Costs are given per layer; every schedule partitions the same layers, so a chunk holds
``k = layers / model_stages`` of them (a DualPipeV chunk is half a 1F1B stage).

Without all-to-alls a chunk costs ``F = kF``, ``B = kB``, ``W = kW`` and an overlapped pair
``F&B = F + B``: a chunk of plain layers has nothing to interleave, so the engine runs a pair's
halves back to back.

With an MoE all-to-all of ``a`` seconds (measured alone, see ``bench``) per dispatch and per
combine, every forward and every backward of a layer waits for two of them:
``F = k(F + 2a)``, ``B = k(B + 2a)``, ``W = kW`` (an ``I`` costs ``B - W``). An overlapped pair
run without overlap costs ``F + B``. With overlap (dualpipe, dualpipev) the engine alternates
the backward's and the forward's steps (:func:`~deepspeed_dualpipe.runtime.autograd.steps.interleave`): a step
waits for its own micro-batch's last all-to-all, computes up to the next all-to-all, launches it,
and hands over to the other micro-batch. :func:`overlapped_pair` replays that with these costs:

    backward steps: 0, then B/2 per island, 2k islands     (each but the last launches an a2a)
    forward steps:  F/2 per island, 2k islands, then 0
    t_next = max(t, a2a of this micro-batch done) + step

so ``F&B`` = ``F + B`` (all compute) when every ``a`` fits under the other micro-batch's step,
plus what sticks out where it does not: about ``max(F + B, 4a)`` per layer for large ``a``.

Peak activation memory: the simulator counts live (chunk, micro-batch) activations per rank
(from a forward to the end of its backward, its W when split); one unit is what a chunk of the
bench's layers keeps for one micro-batch (:func:`activation_unit_bytes`).
"""

from typing import Dict, List, Sequence

from deepspeed_dualpipe.analysis.symbolic import Costs
from deepspeed_dualpipe.schedule import PAIRED_SCHEDULES, get_spec
from deepspeed_dualpipe.analysis.simulate import simulate


def layers_per_chunk(schedule: str, stages: int, layers: int) -> int:
    model_stages = get_spec(schedule).layout(stages, 2 * stages).model_stages
    if layers % model_stages:
        raise ValueError(f"{layers} layers do not split evenly into the {model_stages} model stages of {schedule!r} "
                         f"on {stages} ranks; use a multiple of {model_stages}")
    return layers // model_stages


def interleaved(first: Sequence[float], second: Sequence[float], a2a: float) -> float:
    """Wall time of :func:`~deepspeed_dualpipe.runtime.autograd.steps.interleave` on two step lists (compute seconds
    per step; every step but a list's last launches an all-to-all of ``a2a`` seconds, which that
    list's next step waits for)."""
    steps, done, index, t = (list(first), list(second)), [0.0, 0.0], [0, 0], 0.0
    while index[0] < len(steps[0]) or index[1] < len(steps[1]):
        for d in (0, 1):
            if index[d] < len(steps[d]):
                t = max(t, done[d]) + steps[d][index[d]]
                index[d] += 1
                done[d] = t + a2a if index[d] < len(steps[d]) else t
    return t


def overlapped_pair(layers: int, F: float, B: float, a2a: float) -> float:
    """``F&B`` of a chunk of ``layers`` MoE layers, backward (full) leading, as the engine runs it."""
    backward = [0.0] + [B / 2] * (2 * layers)
    forward = [F / 2] * (2 * layers) + [0.0]
    return interleaved(backward, forward, a2a)


def chunk_costs(schedule: str,
                stages: int,
                layers: int,
                F: float,
                B: float,
                W: float,
                a2a: float = 0.0,
                overlap: bool = True) -> Costs:
    k = layers_per_chunk(schedule, stages, layers)
    if not a2a:
        return Costs(F=k * F, B=k * B, W=k * W)
    pair = overlapped_pair(k, F, B, a2a) if overlap and schedule in PAIRED_SCHEDULES else None
    return Costs(F=k * (F + 2 * a2a), B=k * (B + 2 * a2a), W=k * W, FB=pair)


def activation_unit_bytes(schedule: str, stages: int, layers: int, width: int, a2a_bytes: int = 0) -> int:
    """Bytes one (chunk, micro-batch) keeps from its forward to its backward: each layer's input
    (kept for its weight gradient), with all-to-alls also the tensors the experts and the decode
    keep (one all-to-all tensor each), and the chunk's output (kept for the backward)."""
    k = layers_per_chunk(schedule, stages, layers)
    act = 4 * width
    a2a_tensor = 4 * (a2a_bytes // 4 // 2 * 2)  # whole floats, split evenly between the 2 expert-parallel ranks
    return k * (act + 2 * a2a_tensor) + act


def predicted(schedule: str,
              stages: int,
              micro_batches: int,
              layers: int,
              F: float,
              B: float,
              W: float,
              a2a: float = 0.0,
              overlap: bool = True,
              width: int = 0,
              a2a_bytes: int = 0) -> dict:
    """Simulated step time (seconds), bubble fraction and peak live activations per rank."""
    costs = chunk_costs(schedule, stages, layers, F, B, W, a2a, overlap)
    sim = simulate(schedule, stages, micro_batches, costs)
    unit = activation_unit_bytes(schedule, stages, layers, width, a2a_bytes)
    return {
        "sim_step_s": sim.makespan,
        "sim_bubble": [b / sim.makespan for b in sim.bubble],
        "sim_pair_s": costs.pair if costs.FB is not None else None,
        "sim_peak_activations": sim.peak_activations,
        "activation_unit_bytes": unit,
        "sim_peak_activation_bytes": [n * unit for n in sim.peak_activations]
    }


def scaling(schedules: List[str],
            ranks=(4, 8, 16, 32),
            layers_per_stage: int = 2,
            F=1.0,
            B=2.0,
            W=1.0,
            micro_batches_per_rank: int = 4) -> Dict[int, Dict[str, float]]:
    """Worst rank's simulated bubble fraction for each P, with a model of ``layers_per_stage * P``
    layers and M = ``micro_batches_per_rank * P`` (the bubble fraction depends on M/P, so it is kept)."""
    table = {}
    for P in ranks:
        M, layers = micro_batches_per_rank * P, layers_per_stage * P
        row = {}
        for name in schedules:
            try:
                get_spec(name).validate(P, M)
                row[name] = max(predicted(name, P, M, layers, F, B, W)["sim_bubble"])
            except ValueError:
                row[name] = None
        table[P] = row
    return table
