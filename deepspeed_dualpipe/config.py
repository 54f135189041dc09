"""The plugin's settings, read from the DeepSpeed config.

Two places in the DeepSpeed config dict matter::

    {
      "pipeline": {"schedule": "dualpipev"},      # which schedule; "1f1b" when absent
      "dualpipe": {                              # optional; knobs of the plugin's engine
        "split_backward": true,
        "overlap_moe_a2a": true,
        "recompute_islands": [],
        "p2p_timeout_s": 300,
        "verify_schedule": true,
        "monitor_interval": 1,                   # the plugin's figures in DeepSpeed's monitor
        "monitor_memory": false,
        "profile_step": null,                    # record a step for `advise`
        "profile_path": "dualpipe_profile.json"
      }
    }

DeepSpeed copies ``pipeline`` keys through untouched and ignores unknown top-level keys,
so neither needs a change in DeepSpeed. Both are validated here, up front, with errors that
name the key path instead of a pydantic traceback.
"""

import difflib
import math
from typing import Any, Dict, List, Optional, Union

from pydantic import Field, StrictStr, ValidationError, field_validator

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from deepspeed.utils import logger

from deepspeed_dualpipe.schedule import PLUGIN_SCHEDULES, SCHEDULES, get_spec

DEFAULT_SCHEDULE = "1f1b"
MIN_TIMEOUT_S = 1.0  # dualpipe.p2p_timeout_s below this is refused


class DualPipeSection(DeepSpeedConfigModel):
    """The top-level ``"dualpipe"`` section. Unknown keys are errors (``extra="forbid"``)."""

    split_backward: bool = True
    """Run the input-gradient (I) and weight-gradient (W) halves of backward separately, as the
    schedule places them. ``False`` runs a full backward wherever the schedule has I, and skips W."""

    overlap_moe_a2a: bool = True
    """Overlap MoE dispatch/combine all-to-all with the paired chunk's compute."""

    recompute_islands: List[StrictStr] = Field(default_factory=list)
    """Selective activation recomputation inside phased (MoE) chunks: the compute islands of these names
    (``"attention+gate"`` of a ``MoETransformerBlock``, ...) keep only their inputs from the forward and
    run their forward again in the backward, as DeepSeek-V3 recomputes RMSNorm and the MLA
    up-projections. Names that no layer class of the model declares are refused at start-up."""

    p2p_timeout_s: float = Field(300.0, gt=0)
    """Longest any pipeline wait may block before the engine raises an error naming the peer."""

    verify_schedule: bool = True
    """Run the symbolic verifier on every rank's instruction stream once at start-up."""

    @field_validator("recompute_islands")
    @classmethod
    def _names(cls, value):
        if any(not name.strip() for name in value):
            raise ValueError("island names must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("names an island twice")
        return value

    monitor_interval: int = Field(1, ge=1)
    """With a DeepSpeed ``monitor`` enabled: write the plugin's figures (bubble, waits, hidden all-to-all
    time) every this many steps (docs/usage.md, "The plugin's figures in DeepSpeed's monitor")."""

    monitor_memory: bool = False
    """Also write each pipeline rank's peak activation memory, read at the allocator. On CPU this takes
    a step of its own after each monitored one (torch's profiler slows it down)."""

    profile_step: Optional[int] = Field(None, ge=0)
    """Record this step (0-based; memory in the step after it) for ``python -m deepspeed_dualpipe advise``
    into ``profile_path`` (docs/advise.md)."""

    profile_path: str = "dualpipe_profile.json"
    """Where global rank 0 writes the profile of ``profile_step``."""

    @field_validator("p2p_timeout_s", "monitor_interval", "profile_step", mode="before")
    @classmethod
    def _a_number_not_a_bool_or_a_string(cls, value):
        # pydantic's lax mode turns true into 1 and "20" into 20: a config that says either means something else.
        if isinstance(value, (bool, str)):
            raise ValueError(f"must be a number, not {type(value).__name__} {value!r}")
        return value

    @field_validator("p2p_timeout_s")
    @classmethod
    def _finite(cls, value):
        # inf would mean "hang forever", which is exactly what the timeout exists to prevent.
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        if value < MIN_TIMEOUT_S:
            raise ValueError(f"{value:g} s is below the minimum {MIN_TIMEOUT_S:g} s: a wait that short fails healthy "
                             f"steps (a slow step or a checkpoint save waits longer); use seconds such as 300")
        return value


class DualPipeConfig(DeepSpeedConfigModel):
    """Everything the plugin reads from a DeepSpeed config, in the config's own shape.

    ``cfg.dualpipe.p2p_timeout_s`` mirrors the JSON path; the section's settings are also
    readable directly (``cfg.p2p_timeout_s``).
    """

    schedule: str = DEFAULT_SCHEDULE
    """``pipeline.schedule``: a name in :data:`deepspeed_dualpipe.schedule.SCHEDULES`."""

    dualpipe: DualPipeSection = Field(default_factory=DualPipeSection)

    @property
    def uses_plugin_engine(self) -> bool:
        return get_spec(self.schedule).runs_on_plugin_engine

    @property
    def split_backward(self) -> bool:
        return self.dualpipe.split_backward

    @property
    def overlap_moe_a2a(self) -> bool:
        return self.dualpipe.overlap_moe_a2a

    @property
    def recompute_islands(self) -> List[str]:
        return self.dualpipe.recompute_islands

    @property
    def p2p_timeout_s(self) -> float:
        return self.dualpipe.p2p_timeout_s

    @property
    def verify_schedule(self) -> bool:
        return self.dualpipe.verify_schedule


def load_config(ds_config: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The config as a dict, accepted exactly as ``deepspeed.initialize`` accepts it
    (a dict, a path to a JSON/HJSON file, or base64-encoded JSON)."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
    if not isinstance(ds_config, (dict, str)):
        raise ValueError(f"DeepSpeed config must be a dict or a path to a JSON file, got {type(ds_config).__name__}")
    return load_ds_config(ds_config)


def config_schedule(ds_config: Dict[str, Any]) -> str:
    """``pipeline.schedule`` as written (unvalidated), ``"1f1b"`` when absent."""
    pipeline = ds_config.get("pipeline") or {}
    return pipeline.get("schedule", DEFAULT_SCHEDULE) if isinstance(pipeline, dict) else DEFAULT_SCHEDULE


def dualpipe_config(ds_config: Union[str, Dict[str, Any]]) -> DualPipeConfig:
    """Validate the plugin's part of a DeepSpeed config; ``ValueError`` names the offending key path.

    A ``dualpipe`` section beside a DeepSpeed-engine schedule only warns, so ablations can flip
    ``pipeline.schedule`` alone (docs/design.md, "Design notes").
    """
    cfg = load_config(ds_config)
    pipeline = cfg.get("pipeline", {})
    if not isinstance(pipeline, dict):
        raise ValueError(f"'pipeline' must be a dict, got {type(pipeline).__name__}")
    schedule = pipeline.get("schedule", DEFAULT_SCHEDULE)
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"pipeline.schedule={schedule!r} is not a schedule{_did_you_mean(schedule, SCHEDULES)}; "
                         f"valid: {', '.join(SCHEDULES)}")

    section = cfg.get("dualpipe")
    if section is None:
        section = {}
    elif not isinstance(section, dict):
        raise ValueError(f"'dualpipe' must be a dict of settings, got {type(section).__name__}")
    try:
        result = DualPipeConfig(schedule=schedule, dualpipe=DualPipeSection(**section))
    except ValidationError as err:
        raise ValueError(_describe(err, "dualpipe", DualPipeSection)) from None

    if "dualpipe" in cfg and not result.uses_plugin_engine:
        logger.warning(f"the 'dualpipe' config section is ignored with pipeline.schedule={schedule!r}, which runs "
                       f"DeepSpeed's own engine; it applies to {', '.join(PLUGIN_SCHEDULES)}")
    if result.uses_plugin_engine:
        _check_engine_support(cfg, schedule)
    return result


def _check_engine_support(cfg: Dict[str, Any], schedule: str) -> None:
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if isinstance(stage, (int, float)) and stage >= 2:
        raise ValueError(f"zero_optimization.stage={stage} cannot be used with pipeline.schedule={schedule!r}: "
                         "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
    # Precision is DeepSpeed's to validate: fp32, bf16 and fp16 (with DeepSpeed's static or dynamic
    # loss scaling, see DualPipeEngine._scale_loss) all run under the plugin's schedules. One fp16
    # path cannot clip right: at ZeRO stage 0, DeepSpeed's LAMB optimizer (FP16_UnfusedOptimizer's
    # fused-LAMB branch) takes the global norm of flattened gradients, where the second copy of a
    # mirrored stage or tied layer can no longer be left out (DualPipeEngine._take_model_step).
    fp16 = cfg.get("fp16") or {}
    optimizer = cfg.get("optimizer") or {}
    clipping = cfg.get("gradient_clipping", 1.0)  # DeepSpeed clips at 1.0 unless told otherwise
    if (isinstance(fp16, dict) and fp16.get("enabled") is True and stage in (0, None) and isinstance(optimizer, dict)
            and str(optimizer.get("type", "")).lower() == "lamb" and isinstance(clipping,
                                                                                (int, float)) and clipping > 0):
        raise ValueError(f"gradient_clipping={clipping} (DeepSpeed's default is 1.0) with fp16 and optimizer.type="
                         f"{optimizer['type']!r} at ZeRO stage 0 cannot be used with pipeline.schedule={schedule!r}: "
                         f"DeepSpeed's fp16 LAMB step clips by a norm of flattened gradients that would count the "
                         f"second copy of a mirrored stage or tied layer twice. Set gradient_clipping to 0, or use "
                         f"another optimizer")


def _did_you_mean(word, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(err: ValidationError, prefix: str, model) -> str:
    """One line per pydantic error, each naming its full key path."""
    valid = list(model.model_fields)
    lines = []
    for e in err.errors():
        path = ".".join([prefix, *map(str, e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"{path} is not a valid key{_did_you_mean(e['loc'][-1], valid)}; "
                         f"valid keys: {', '.join(valid)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{path}={e.get('input')!r} is invalid: {msg}")
    return "; ".join(lines)


__all__ = [
    "DualPipeConfig", "DualPipeSection", "dualpipe_config", "load_config", "config_schedule", "DEFAULT_SCHEDULE"
]
