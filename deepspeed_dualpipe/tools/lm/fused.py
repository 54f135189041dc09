"""NVIDIA apex's fused kernels for the demo model, where apex is installed.

apex is optional and never installed by this project (the PyPI package named ``apex`` is an unrelated web
toolkit; NVIDIA's is built from source on GPU machines). Where ``import apex`` finds NVIDIA's:

- every RMSNorm of the demo model is ``apex.normalization.FusedRMSNorm`` (same parameter, ``weight``, and
  the same epsilon as torch's; apex computes it in Python for CPU tensors);
- ``"lm": {"fused_adam": true}`` trains with ``apex.optimizers.FusedAdam`` built from the config's
  ``optimizer.params`` (on CUDA only: its kernels have no CPU path).

Otherwise torch's ``RMSNorm`` and the config's optimizer are used. Either way :func:`describe` is the one
line the demo logs to say which.
"""

from typing import Callable, Dict, Optional, Tuple

import torch


def apex_rms_norm() -> Optional[type]:
    """NVIDIA apex's ``FusedRMSNorm``, or None (no apex, or another package named apex)."""
    try:
        from apex.normalization import FusedRMSNorm
    except (ImportError, AttributeError):
        return None
    return FusedRMSNorm


def apex_fused_adam() -> Optional[type]:
    try:
        from apex.optimizers import FusedAdam
    except (ImportError, AttributeError):
        return None
    return FusedAdam


class ApexRMSNorm(torch.nn.Module):
    """``torch.nn.RMSNorm(hidden, eps)`` computed by apex's ``FusedRMSNorm`` (eps None: torch's default)."""

    def __new__(cls, hidden_size: int, eps: Optional[float] = None):
        fused = apex_rms_norm()
        if eps is None:
            eps = torch.finfo(torch.get_default_dtype()).eps  # what torch.nn.RMSNorm uses
        return fused(hidden_size, eps=eps)


def rms_norm() -> type:
    """The RMSNorm the demo model builds: apex's where present, else torch's."""
    return ApexRMSNorm if apex_rms_norm() is not None else torch.nn.RMSNorm


def optimizer(config: Dict, fused_adam: bool, device) -> Tuple[Optional[Callable], Dict, str]:
    """``(optimizer factory or None, config, description)``: with ``fused_adam`` and apex's FusedAdam on a CUDA
    device, a factory building it from ``config["optimizer"]["params"]`` and the config without its
    ``optimizer`` section (DeepSpeed then takes the factory); otherwise ``(None, config, ...)`` unchanged."""
    section = config.get("optimizer") or {}
    named = f"the config's optimizer ({section.get('type', 'none')})"
    if not fused_adam:
        return None, config, named
    cls = apex_fused_adam()
    if cls is None:
        return None, config, f"{named}; lm.fused_adam asked for apex FusedAdam, but NVIDIA apex is not installed"
    if torch.device(device).type != "cuda":
        return None, config, f"{named}; apex FusedAdam runs on CUDA only, and this job runs on {device}"
    params = {k: v for k, v in (section.get("params") or {}).items() if k in ("lr", "betas", "eps", "weight_decay")}
    rest = {k: v for k, v in config.items() if k != "optimizer"}
    return (lambda parameters: cls(parameters, **params)), rest, f"apex FusedAdam ({params})"


def describe(norm: type, optimizer_text: str) -> str:
    where = "apex FusedRMSNorm" if norm is ApexRMSNorm else "torch.nn.RMSNorm (NVIDIA apex not found)"
    return f"[lm] kernels: RMSNorm {where}; optimizer {optimizer_text}"


__all__ = ["apex_rms_norm", "apex_fused_adam", "ApexRMSNorm", "rms_norm", "optimizer", "describe"]
