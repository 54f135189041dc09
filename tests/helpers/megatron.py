"""Megatron-DeepSpeed's own GPT-MoE pretraining, run as a user runs it: the pristine snapshot, the CPU-enabling
patch and the plugin's one-line patch (patches/megatron/), its unchanged ``pretrain_gpt.py`` launched by
DeepSpeed's launcher on CPU ranks in a :class:`Layout` (by default 4 ranks: pipeline 2 x data 2, expert-parallel 2).

The snapshot is found through ``DUALPIPE_MEGATRON_SNAPSHOT`` (``.ci/run`` sets it to
``../shared/third_party/megatron-deepspeed-4efb479d.tar.gz``); without it the tests are skipped, saying so.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from deepspeed_dualpipe.testing.launch import free_port
from deepspeed_dualpipe.testing.shm import release_shared_memory

ROOT = Path(__file__).resolve().parents[2]
PATCHES = [
    ROOT / "patches" / "megatron" / name
    for name in ("megatron-deepspeed-4efb479d-cpu.patch", "megatron-deepspeed-4efb479d-dualpipe.patch")
]
NAME = "Megatron-DeepSpeed-4efb479d"
PROBE = Path(__file__).resolve().parent / "megatron_probe"
A2A_PROBE = Path(__file__).resolve().parent / "a2a_probe"  # its module; PROBE's sitecustomize installs it
MICRO, GAS = 2, 8  # 8 micro-batches per step: DualPipe needs M >= 2P and even


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the job runs: ``tp`` x ``pp`` x ``dp`` ranks, MoE experts over ``ep`` of the data-parallel ranks, a GPT
    of ``layers`` layers (every second one MoE: 4 experts, top-2), tied embedding and head. ``clip``: DeepSpeed's
    ``gradient_clipping`` (0: none); ``config``: more DeepSpeed config (top-level keys as JSON, e.g.
    ``'{"zero_optimization": {"stage": 1}}'``); ``args``: more Megatron flags (e.g. ``("--bf16",)``)."""
    tp: int = 1
    pp: int = 2
    dp: int = 2
    ep: int = 2
    layers: int = 4
    clip: float = 0.0
    config: str = "{}"
    args: tuple = ()

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        extra = "".join(f"-{a.strip('-')}" for a in self.args)
        zero = json.loads(self.config).get("zero_optimization", {}).get("stage")
        return (f"tp{self.tp}pp{self.pp}dp{self.dp}ep{self.ep}l{self.layers}" +
                (f"-clip{self.clip:g}" if self.clip else "") + (f"-zero{zero}" if zero is not None else "") + extra)

    def model_args(self) -> list:
        args = [
            "--num-layers",
            str(self.layers), "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--num-experts", "4", "--topk", "2", "--expert-interval", "2",
            "--moe-expert-parallel-size",
            str(self.ep), "--disable-moe-top2-2nd-expert-sampling", "--pipeline-model-parallel-size",
            str(self.pp), "--tensor-model-parallel-size",
            str(self.tp), "--micro-batch-size",
            str(MICRO), "--global-batch-size",
            str(MICRO * GAS * self.dp), "--lr", "1e-3", "--lr-decay-style", "constant", "--weight-decay", "0.01",
            "--optimizer", "adam", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad",
            str(self.clip), "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--seed", "1234", "--data-impl",
            "mmap", "--split", "100,0,0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--log-interval",
            "1", "--eval-interval", "1000000", "--eval-iters", "0"
        ]
        if self.tp > 1:
            # Megatron's MoE experts with --use-cpu-initialization are built tensor-parallel only with this flag
            args.append("--enable-expert-tensor-parallelism")
        return args + list(self.args)

    def ds_config(self, schedule: str, pipeline: dict = None) -> dict:
        pipe = {}
        if self.tp > 1 and self.pp > 1:
            # DeepSpeed's partitioned activations and gradients between stages do not fit Megatron's MoE layer,
            # which sends its aux loss as a second activation; TP users of this model turn them off
            pipe = {"pipe_partitioned": False, "grad_partitioned": False}
        return dict(
            {
                "train_batch_size": MICRO * GAS * self.dp,
                "train_micro_batch_size_per_gpu": MICRO,
                "gradient_accumulation_steps": GAS,
                "steps_per_print": 10**9,
                "gradient_clipping": self.clip,
                "prescale_gradients": False,
                "wall_clock_breakdown": False,
                "pipeline": dict(pipe, **(pipeline or {}), schedule=schedule)
            }, **json.loads(self.config))


DEFAULT = Layout()
WORLD = DEFAULT.world  # pipeline 2 x data 2
# What a CPU needs (see patches/megatron/README.md).
CPU_ARGS = [
    "--use-cpu-initialization", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    "--no-gradient-accumulation-fusion", "--distributed-backend", "gloo", "--num-workers", "0"
]
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| loss: (\S+) \| lm loss: (\S+) \| moe loss: (\S+) \|")


def snapshot() -> Path:
    path = os.environ.get("DUALPIPE_MEGATRON_SNAPSHOT")
    if not path:
        pytest.skip("DUALPIPE_MEGATRON_SNAPSHOT is not set (.ci/run sets it to the Megatron-DeepSpeed snapshot in "
                    "../shared/third_party)")
    if not Path(path).is_file():
        pytest.fail(f"DUALPIPE_MEGATRON_SNAPSHOT={path} is not a file")
    return Path(path)


def prepare(dest: Path) -> tuple:
    """Unpack the snapshot into ``dest``, apply the patches, build Megatron's dataset helper and a small dataset
    (the text of ``pydoc_data.topics``, byte tokens). Returns (tree, data prefix)."""
    with tarfile.open(snapshot()) as archive:
        archive.extractall(dest, filter="data")
    tree = dest / NAME
    for patch in PATCHES:
        subprocess.run(["patch", "-p1", "--no-backup-if-mismatch", "-i",
                        str(patch)],
                       cwd=tree,
                       check=True,
                       capture_output=True)
    env = _env()
    subprocess.run(["make", "-C", "megatron/data"], cwd=tree, env=env, check=True, capture_output=True)
    data = dest / "data" / "topics"
    data.parent.mkdir()
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("megatron_data.py")),
         str(tree), str(data)],
        env=env,
        check=True,
        capture_output=True)
    return tree, f"{data}_text_document"


def _env() -> dict:
    venv_bin = os.path.dirname(sys.executable)  # Megatron's rank 0 runs `make` with python3 and pybind11
    return dict(os.environ,
                DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1",
                PYTHONHASHSEED="0",
                PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                PYTHONPATH=os.pathsep.join(
                    filter(None, [str(PROBE), str(A2A_PROBE),
                                  str(ROOT), os.environ.get("PYTHONPATH")])))


def run(tree: Path,
        data: str,
        workdir: Path,
        schedule: str,
        iters: int = 20,
        pipeline: dict = None,
        extra_args=(),
        checkpoint_activations: bool = False,
        timeout: float = 600,
        env: dict = None,
        layout: Layout = DEFAULT) -> dict:
    """Run ``pretrain_gpt.py`` under ``schedule`` in ``layout`` (``env``: more variables for its ranks); returns
    {"iterations": [{"loss", "lm loss", "moe loss"}, ...], "calls": per-rank counts of Megatron's linear
    forward/backward, "log": the output, "returncode": the launcher's, or a string saying it timed out}."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ds.json").write_text(json.dumps(layout.ds_config(schedule, pipeline)))
    probe = workdir / "probe"
    probe.mkdir(exist_ok=True)
    ckpt = ["--checkpoint-activations", "--checkpoint-num-layers", "1", "--deepspeed-activation-checkpointing"] \
        if checkpoint_activations else []
    port = free_port()
    command = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus",
        str(layout.world), "--master_port",
        str(port), "pretrain_gpt.py", *layout.model_args(), "--train-iters",
        str(iters), "--data-path", data, *CPU_ARGS, "--deepspeed", "--deepspeed_config",
        str(workdir / "ds.json"), *ckpt, *extra_args
    ]
    try:
        # the output goes to the log as it comes, so a run that times out still shows how far it got; its own
        # session, so a timeout ends the launcher's ranks too
        with open(workdir / "log.txt", "w") as out:
            job = subprocess.Popen(command,
                                   cwd=tree,
                                   env=dict(_env(), DUALPIPE_PROBE_DIR=str(probe), **(env or {})),
                                   stdout=out,
                                   stderr=subprocess.STDOUT,
                                   start_new_session=True)
            try:
                returncode = job.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
                returncode = f"timed out after {timeout} s"
    finally:
        release_shared_memory(port)
    log = (workdir / "log.txt").read_text()
    iterations = {
        int(m[0]): {
            "loss": float(m[1]),
            "lm loss": float(m[2]),
            "moe loss": float(m[3])
        }
        for m in ITERATION.findall(log)
    }
    calls = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))]
    return {
        "iterations": [iterations[i] for i in sorted(iterations)],
        "numbers": sorted(iterations),  # Megatron's own iteration numbers, as logged
        "calls": calls,
        "log": log,
        "returncode": returncode
    }


def tail(result: dict, lines: int = 40) -> str:
    return "\n".join([f"returncode: {result['returncode']}"] + result["log"].splitlines()[-lines:])


def main(argv=None) -> int:
    """``python -m tests.helpers.megatron DIR [schedule ...]``: prepare the job in DIR, run it under each schedule
    (``name+ckpt`` adds activation checkpointing) and print the losses as a markdown table."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("schedules", nargs="*", default=["1f1b", "zb1p", "dualpipe", "dualpipev"])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    tree, data = (args.dir / NAME, str(args.dir / "data" / "topics_text_document")) \
        if (args.dir / NAME).is_dir() else prepare(args.dir)
    results = {}
    for name in args.schedules:
        schedule, _, option = name.partition("+")
        results[name] = run(tree,
                            data,
                            args.dir / "runs" / name,
                            schedule,
                            args.iters,
                            checkpoint_activations=option == "ckpt")
        if results[name]["returncode"]:
            print(tail(results[name]), file=sys.stderr)
            return 1
    shown = sorted({1, args.iters // 2, args.iters})
    print("| iteration | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for i in shown:
        cells = [results[n]["iterations"][i - 1] for n in results]
        print(f"| {i} | " + " | ".join(f"{c['loss']:.6f} (lm {c['lm loss']:.6f}, moe {c['moe loss']:.6f})"
                                       for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
