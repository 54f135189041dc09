"""Reads what tests/helpers/megatron_probe/grad_probe.py saved for every rank of a Megatron job, and computes in this
one process the true global gradient norm and clip coefficient of the whole model, from all ranks' gradients.

Every tensor a rank holds is a copy of one logical tensor, named by :func:`key`: its parameter name, its
tensor-parallel rank if it is a TP shard (:func:`tp_shard`), and its expert-parallel rank if it is an expert (each EP
rank holds other experts). The copies of one logical tensor (data-parallel or expert-data-parallel replicas, TP
replicas such as layer norms and row-parallel biases, DualPipe's mirror copies, tied embedding and head) must be
bit-identical, and count once.
"""

import math
from pathlib import Path

import torch


def load(directory: Path, which) -> list:
    """Every rank's record of iteration ``which`` (an int) or ``"final"``, by rank."""
    paths = sorted(Path(directory).glob(f"rank*-{'iter' if which != 'final' else ''}{which}.pt"))
    records = [torch.load(p, weights_only=False) for p in paths]
    return sorted(records, key=lambda r: r["coordinates"]["rank"])


def tp_shard(param: dict) -> bool:
    """Megatron's own account, from the linear that owns the parameter rather than from its flags: a sliced
    column-parallel linear's weight and bias and a sliced row-parallel linear's weight are shards, as is anything
    Megatron marked ``tensor_model_parallel``. (DeepSpeed's ``Experts`` deep-copies Megatron's expert, and a copied
    ``Parameter`` loses the mark: an expert's shards are unmarked unless someone marks them again.)"""
    kind, leaf, sliced = param["owner"]
    return (param["tensor_model_parallel"] or (sliced and kind == "ColumnParallelLinear")
            or (sliced and kind == "RowParallelLinear" and leaf == "weight"))


def key(param: dict, coordinates: dict) -> tuple:
    expert = not param["allreduce"]
    return (param["name"], coordinates["tp"] if tp_shard(param) else None,
            coordinates["ep"][param["group_name"]] if expert else None)


def logical(records: list, field: str, leave_out=()) -> dict:
    """{key: [(coordinates, tensor), ...]}: every copy of every logical tensor, by rank (``field``: "grad" or
    "value"), but the (key, rank) pairs in ``leave_out``."""
    copies = {}
    for record in records:
        for param in record["params"]:
            k = key(param, record["coordinates"])
            if (k, record["coordinates"]["rank"]) not in leave_out:
                copies.setdefault(k, []).append((record["coordinates"], param[field]))
    return copies


def unused_holders(copies: dict) -> set:
    """(key, rank) of the holders whose gradient is all zeros where another holder's is not: a parameter of the same
    name that the rank never uses, not a copy. Under a linear schedule the last stage holds Megatron's whole
    embedding module (to tie the word embedding with the head), whose position embedding is unused there and is not
    reduced with the first stage's. It counts as its own tensor, whose gradient adds nothing to the norm."""
    unused = set()
    for k, held in copies.items():
        if any(t.any() for _, t in held):
            unused |= {(k, c["rank"]) for c, t in held if not t.any()}
    return unused


def differing_copies(copies: dict) -> list:
    """The logical tensors whose copies are not all bit-identical: [(key, ranks), ...]."""
    return [(k, [c["rank"] for c, _ in held]) for k, held in copies.items()
            if any(not torch.equal(held[0][1], t) for _, t in held[1:])]


def tp_replicas(copies: dict) -> dict:
    """The logical tensors that more than one tensor-parallel rank holds whole (layer norms, row-parallel biases)."""
    return {k: held for k, held in copies.items() if len({c["tp"] for c, _ in held}) > 1}


def true_norm(copies: dict) -> float:
    """The 2-norm of the whole model's gradient, each logical tensor once (its lowest rank's copy), in float64."""
    return math.sqrt(sum(float(held[0][1].double().pow(2).sum()) for held in copies.values()))


def deepspeed_norm(records: list) -> float:
    """The norm DeepSpeed 0.19.8's ``clip_grad_norm_`` computes for its 1F1B with the pipeline grid as ``mpu``: a
    parameter not marked model-parallel counts only on the grid's model-parallel rank 0 (the pipeline x tensor
    group's first rank: stage 0, TP rank 0), a marked one on every rank; squares summed over pipeline x tensor ranks,
    and the root averaged over data parallelism."""
    squares = {}
    for record in records:
        c = record["coordinates"]
        first = c["pp"] == 0 and c["tp"] == 0
        squares[c["dp"]] = squares.get(c["dp"], 0.0) + sum(
            float(p["grad"].double().pow(2).sum()) for p in record["params"] if first or p["tensor_model_parallel"])
    return sum(math.sqrt(v) for v in squares.values()) / len(squares)


def coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s rule, which the plugin and DeepSpeed both follow."""
    return min(1.0, max_norm / (norm + 1e-6))


def applied(records: list) -> list:
    """Per rank, the distinct multipliers its clipping applied to its gradients."""
    return [sorted({float(v) for m in r["multipliers"] for v in m.tolist()}) for r in records]
