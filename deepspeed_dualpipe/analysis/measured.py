"""Measured costs as the simulator's :class:`~deepspeed_dualpipe.analysis.symbolic.Costs`."""

from typing import Dict, Optional

from deepspeed_dualpipe.analysis.symbolic import Costs


def simulator_costs(costs: Dict[str, float]) -> Optional[Costs]:
    """Per-chunk :class:`Costs` in units of a forward, from mean seconds of each kind of computation
    (``F``, ``B``, ``I``, ``W``, and the pairs ``FB`` = forward + full backward, ``FI`` = forward + input
    part); None without a forward or a backward."""
    F = costs.get("F")
    if not F:
        return None
    W = costs.get("W", 0.0)
    if "B" in costs:
        B = costs["B"]
    elif "I" in costs:
        B = costs["I"] + W
    else:
        return None
    W = min(W, B)
    pair = costs.get("FI", None)
    pair = pair + W if pair is not None else costs.get("FB")
    return Costs(F=1.0, B=B / F, W=W / F, FB=None if pair is None else pair / F)


__all__ = ["simulator_costs"]
