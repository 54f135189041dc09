"""Train a small DeepSeek-V3-style MoE language model with the pipeline schedule its config names.

    deepspeed --num_gpus 4 examples/train_moe_lm.py --deepspeed_config configs/dualpipe_moe.json

(``DS_ACCELERATOR=cpu`` on a machine without GPUs.) DeepSpeed's own keys in the config set the
batch, optimizer, scheduler and ``pipeline.schedule``; its ``"lm"`` section sets the model, data
and run length (``--steps``, ``--name`` and ``--out-dir`` override it). A config may extend another
with ``"base": "other.json"`` (see ``configs/ablation/``). Rank 0 prints progress and
writes ``runs/<name>/``: metrics.json, loss.png, timeline.png, timeline_simulated.png, trace.json.
"""

import argparse
import sys

import deepspeed
from deepspeed.accelerator import get_accelerator

from deepspeed_dualpipe.tools.lm.train import prepare_config, train, use_cores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--steps", type=int, help="override lm.steps")
    parser.add_argument("--name", help="override lm.name, the run's directory under lm.out_dir")
    parser.add_argument("--out-dir", help="override lm.out_dir (default runs)")
    parser = deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
    args = parser.parse_args()

    use_cores()  # the ranks of one machine share its cores
    deepspeed.init_distributed(dist_backend="nccl" if get_accelerator().device_name() == "cuda" else "gloo")
    config, lm = prepare_config(args.deepspeed_config, args.steps, args.name, args.out_dir)
    # train() builds the PipelineModule and calls deepspeed.initialize, after deepspeed_dualpipe.install():
    # the schedule comes from the config's "pipeline": {"schedule": ...}.
    train(config, lm, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
