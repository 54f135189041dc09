"""The simulator's figures for the bench's layers.

Costs are given per layer; every schedule partitions the same layers, so a chunk holds
``layers / model_stages`` of them (a DualPipeV chunk is half a 1F1B stage). F&B = F + B: the
engine runs a pair's halves back to back, without overlap yet.
"""

from typing import Dict, List

from deepspeed_dualpipe.executor import Costs
from deepspeed_dualpipe.schedules import get_spec
from deepspeed_dualpipe.simulate import simulate


def layers_per_chunk(schedule: str, stages: int, layers: int) -> int:
    model_stages = get_spec(schedule).layout(stages, 2 * stages).model_stages
    if layers % model_stages:
        raise ValueError(f"{layers} layers do not split evenly into the {model_stages} model stages of {schedule!r} "
                         f"on {stages} ranks; use a multiple of {model_stages}")
    return layers // model_stages


def chunk_costs(schedule: str, stages: int, layers: int, F: float, B: float, W: float) -> Costs:
    k = layers_per_chunk(schedule, stages, layers)
    return Costs(F=k * F, B=k * B, W=k * W)


def predicted(schedule: str, stages: int, micro_batches: int, layers: int, F: float, B: float, W: float) -> dict:
    """Simulated step time (seconds) and bubble fraction per rank."""
    sim = simulate(schedule, stages, micro_batches, chunk_costs(schedule, stages, layers, F, B, W))
    return {"sim_step_s": sim.makespan, "sim_bubble": [b / sim.makespan for b in sim.bubble]}


def scaling(schedules: List[str], ranks=(4, 8, 16, 32), layers_per_stage: int = 2, F=1.0, B=2.0, W=1.0,
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
