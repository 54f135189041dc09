"""What the checkpoint checksums cost: the demo model's checkpoint files (configs/dualpipe_moe.json: one file per
layer, and a model-states file with the Adam state), saved and loaded the way DeepSpeed's torch checkpoint engine
does, with and without the plugin's checksum (computed while writing; checked by reading before the load). Every file
is flushed to disk as the plugin's atomic save does.

    python -m deepspeed_dualpipe.tools.bench.checksum_cost [CONFIG] [--repeats N]
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from deepspeed_dualpipe.checkpoint import checksums


def _files(config_path: str) -> dict:
    """name -> state dict, as a save of the demo model writes them (per layer; Adam state with the last)."""
    from deepspeed_dualpipe.tools.lm.model import LocalModel, ModelConfig, layer_specs
    with open(config_path) as f:
        model = LocalModel(layer_specs(ModelConfig.from_dict(json.load(f)["lm"]["model"])))
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    files = {}
    for name, module in model.named_children():
        if isinstance(module, torch.nn.ModuleList):
            files.update({f"layer_{i:02d}-model_states.pt": m.state_dict() for i, m in enumerate(module)})
        else:
            files[f"{name}-model_states.pt"] = module.state_dict()
    files["mp_rank_00_model_states.pt"] = {"module": None, "optimizer": optimizer.state_dict(), "global_steps": 1}
    return files


def _save(files, directory, hashed):
    """As the plugin's save writes: each file, then flushed to disk (``fsync``), with or without its checksum."""
    from deepspeed_dualpipe.checkpoint.files import fsync_file
    for name, state in files.items():
        path = os.path.join(directory, name)
        if hashed:
            with open(path, "wb") as f:
                writer = checksums.HashingWriter(f)
                torch.save(state, writer)
        else:
            torch.save(state, path)
        fsync_file(path)


def _load(files, directory, checked):
    for name in files:
        path = os.path.join(directory, name)
        if checked:
            checksums.of_file(path)
        torch.load(path, weights_only=False)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deepspeed_dualpipe.tools.bench.checksum_cost")
    parser.add_argument("config", nargs="?", default="configs/dualpipe_moe.json")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    files = _files(args.config)
    directory = tempfile.mkdtemp(prefix="checksum-cost-")
    best = {}
    try:
        for _ in range(args.repeats):  # interleaved, best of N: the machine's other load hits both alike
            for hashed in (False, True):
                start = time.perf_counter()
                _save(files, directory, hashed)
                best[("save", hashed)] = min(best.get(("save", hashed), 1e9), time.perf_counter() - start)
                start = time.perf_counter()
                _load(files, directory, hashed)
                best[("load", hashed)] = min(best.get(("load", hashed), 1e9), time.perf_counter() - start)
        size = sum(os.path.getsize(os.path.join(directory, n)) for n in files)
    finally:
        shutil.rmtree(directory)
    print(f"{len(files)} files, {size / 2**20:.1f} MiB; checksum {checksums.PREFERRED}; best of {args.repeats}")
    for what in ("save", "load"):
        plain, hashed = best[(what, False)], best[(what, True)]
        print(f"{what}: {1e3 * plain:.1f} ms without, {1e3 * hashed:.1f} ms with checksums "
              f"(+{100 * (hashed - plain) / plain:.1f}% of the {what} time)")


if __name__ == "__main__":
    main()
