"""Train a small DeepSeek-V3-style MoE language model with the pipeline schedule its config names.

    deepspeed --num_gpus 4 examples/train_moe_lm.py --deepspeed_config configs/dualpipe_moe.json

(``DS_ACCELERATOR=cpu`` on a machine without GPUs.) DeepSpeed's own keys in the config set the
batch, optimizer, scheduler and ``pipeline.schedule``; its ``"lm"`` section sets the model, data
and run length (``--steps``, ``--name`` and ``--out-dir`` override it). A config may extend another
with ``"base": "other.json"`` (see ``configs/ablation/``). Rank 0 prints progress and
writes ``runs/<name>/``: metrics.json, loss.png, timeline.png, timeline_simulated.png, trace.json.
"""

import sys

from deepspeed_dualpipe.tools.lm.job import main

if __name__ == "__main__":
    sys.exit(main())
