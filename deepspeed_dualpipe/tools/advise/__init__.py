"""``python -m deepspeed_dualpipe advise PROFILE [PROFILE ...]``: every schedule predicted from a profiled step.

The profile (``dualpipe.profile_step``, format in docs/advise.md) holds what each computation of one step
took on every rank, and the allocator's bytes after each instruction of the next. From it:

- :mod:`.costs` derives what one micro-batch costs through the whole model (:class:`ModelCosts`): forward,
  split and whole backward, all-to-all, serial work, CPU work; more profiles fill in what one cannot show;
- :mod:`.memory` fits each stage's bytes per live micro-batch to the allocator's samples, and walks any
  schedule's instruction streams with them;
- :mod:`.predict` cuts the costs into each schedule's chunks, runs the simulator, adds each rank's serial work
  (and on CPU, where ranks share cores, takes at least all ranks' CPU work over the cores they got), and
  recommends;
- :mod:`.cli` prints it, beside measured runs where given. docs/advise.md says how, and how close it comes.

It assumes the profiled costs carry over: per-chunk costs scale with the share of the model a chunk holds,
and the engine's per-activation memory is the plugin's (DeepSpeed's own engines cannot be profiled).
"""

from deepspeed_dualpipe.schedule import SCHEDULES
from deepspeed_dualpipe.tools.advise.cli import add_parser, main, measured_runs, parse_budget
from deepspeed_dualpipe.tools.advise.costs import FORMAT, ModelCosts, backward_costs, combine, load_profile, model_costs
from deepspeed_dualpipe.tools.advise.memory import live_after_each_instruction, memory_fit
from deepspeed_dualpipe.tools.advise.predict import Prediction, backward_s, chunk_costs, peak_activation_bytes, \
    predict, predict_all, recommend, stage_units

__all__ = [
    "FORMAT", "ModelCosts", "Prediction", "SCHEDULES", "add_parser", "backward_costs", "backward_s", "chunk_costs",
    "combine", "live_after_each_instruction", "load_profile", "main", "measured_runs", "memory_fit", "model_costs",
    "parse_budget", "peak_activation_bytes", "predict", "predict_all", "recommend", "stage_units"
]
