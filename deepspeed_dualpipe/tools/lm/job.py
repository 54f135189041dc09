"""The demo's training job in one rank: what ``deepspeed --num_gpus N <this file> --deepspeed_config CONFIG`` runs.

``examples/train_moe_lm.py`` in a source checkout is the same job; this copy ships in the package, so that
``python -m deepspeed_dualpipe demo`` runs from an installed wheel too. See
:mod:`deepspeed_dualpipe.tools.lm.train` for what the job does.
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
