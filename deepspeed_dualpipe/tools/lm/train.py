"""The demo's training job: a byte-level MoE language model on ``pydoc_data.topics``, pipelined by
whichever schedule the DeepSpeed config names.

Launched like any DeepSpeed job; ``examples/train_moe_lm.py`` is the script::

    deepspeed --num_gpus 4 examples/train_moe_lm.py --deepspeed_config configs/dualpipe_moe.json

Everything the job does is in the config: DeepSpeed's own keys (batch sizes, optimizer,
scheduler, ``pipeline.schedule``) and an ``"lm"`` section that DeepSpeed ignores (see
:class:`LMConfig`). Rank 0 prints progress and writes into ``<out_dir>/<name>/``:

- ``metrics.json``: settings, per-step losses, validation losses, throughput, bubbles
  (simulated and measured), memory per rank (parameters, and activations measured at the allocator:
  see :mod:`~deepspeed_dualpipe.runtime.memory`), the generated sample;
- ``loss.png``: training and validation loss;
- ``timeline.png`` and ``trace.json``: every rank's instructions during one measured step,
  as a picture and as a Chrome/Perfetto trace; ``timeline_simulated.png``: the simulator's
  timeline of the same schedule with the measured costs.
"""

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from deepspeed_dualpipe.tools.lm import data as D
from deepspeed_dualpipe.tools.lm import timeline as TL
from deepspeed_dualpipe.runtime.trace import phase_records, resolve_recording, start_recording, stop_recording
from deepspeed_dualpipe.runtime import memory as MEM
from deepspeed_dualpipe.tools.lm.model import (PARTITION, LocalModel, ModelConfig, layer_specs, lm_loss, seed_layer)


@dataclass
class LMConfig:
    """The ``"lm"`` section of the DeepSpeed config."""

    name: str = "dualpipe_moe"  # outputs go to <out_dir>/<name>/
    out_dir: str = "runs"
    pipeline_stages: int = 2  # P; the remaining ranks are data parallelism
    seq_len: int = 64
    steps: int = 200
    print_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 2  # validation batches (each micro_batches x micro-batch size per DP rank)
    trace_step: int = 5  # the step whose timeline is recorded (0-based; -1: none)
    memory_step: Optional[
        int] = None  # the step whose memory is measured (None: two after trace_step; see _memory_step)
    seed: int = 1234
    block_size: int = 4096  # train/validation split: every val_every-th block of block_size bytes
    val_every: int = 10
    sample_prompt: str = "The "
    sample_tokens: int = 240
    sample_temperature: float = 0.7
    fused_adam: bool = False  # NVIDIA apex's FusedAdam where apex is installed and the job runs on CUDA (lm/fused.py)
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def from_dict(cls, values: Dict) -> "LMConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"lm: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        model = ModelConfig.from_dict(values.pop("model", {}) or {})
        return cls(model=model, **values)

    def to_dict(self) -> Dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def use_cores() -> None:
    """One process per rank shares the machine's cores: split them instead of oversubscribing."""
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")) or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(local, 1)))


def prepare_config(path_or_dict,
                   steps: Optional[int] = None,
                   name: Optional[str] = None,
                   out_dir: Optional[str] = None):
    """(DeepSpeed config dict, LMConfig) from a config file, with the command line's overrides applied."""
    from deepspeed_dualpipe.config import load_config
    from deepspeed_dualpipe.tools.lm import config_files
    if isinstance(path_or_dict, (str, Path)) and Path(path_or_dict).is_file():
        path_or_dict = config_files.load(path_or_dict)  # resolves a "base" config
    config = json.loads(json.dumps(load_config(path_or_dict)))  # a private copy
    lm = LMConfig.from_dict(config.get("lm", {}))
    if steps is not None:
        lm.steps = steps
    if name is not None:
        lm.name = name
    if out_dir is not None:
        lm.out_dir = out_dir
    config["lm"] = lm.to_dict()
    scheduler = config.get("scheduler") or {}
    params = scheduler.get("params") or {}
    if "total_num_steps" in params:  # a decaying schedule ends with the run
        params["total_num_steps"] = max(lm.steps, params.get("warmup_num_steps", 1) + 1)
    config.setdefault("steps_per_print", 10**9)  # this job prints its own progress
    for monitor in ("tensorboard", "csv_monitor", "wandb", "comet"):  # one run, one job name: lm.name
        section = config.get(monitor)
        if isinstance(section, dict) and section.get("enabled") and "job_name" not in section:
            section["job_name"] = lm.name
    section = config.get("dualpipe")
    if isinstance(section, dict) and section.get("profile_step") is not None and "profile_path" not in section:
        section["profile_path"] = str(Path(lm.out_dir) / lm.name / "profile.json")  # beside metrics.json
    return config, lm


def build_engine(config: Dict, lm: LMConfig, args=None):
    """The PipelineModule of the model's LayerSpecs, handed to ``deepspeed.initialize`` (which the
    plugin's ``install()`` makes honour ``pipeline.schedule``)."""
    import deepspeed
    import deepspeed_dualpipe
    from deepspeed.pipe import PipelineModule
    deepspeed_dualpipe.install()
    torch.manual_seed(lm.seed)
    # no_grad: PipelineModule broadcasts tied weights in place when it is built.
    with torch.no_grad():
        model = PipelineModule(layers=layer_specs(lm.model),
                               num_stages=lm.pipeline_stages,
                               loss_fn=lm_loss,
                               partition_method=PARTITION,
                               seed_layers=True,
                               base_seed=lm.seed,
                               seed_fn=seed_layer)
    if args is not None:
        args.deepspeed_config = None  # the config (with overrides) is passed as a dict
    from deepspeed.accelerator import get_accelerator
    from deepspeed_dualpipe.tools.lm import fused
    factory, config, optimizer = fused.optimizer(config, lm.fused_adam, get_accelerator().device_name())
    if torch.distributed.get_rank() == 0:
        print(fused.describe(fused.rms_norm(), optimizer), flush=True)
    # model_parameters is left to DeepSpeed: the plugin may rebuild the module for its schedule.
    engine, *_ = deepspeed.initialize(args=args, model=model, config=config, optimizer=factory)
    return engine


def _schedule_name(config: Dict) -> str:
    from deepspeed_dualpipe.config import config_schedule
    return config_schedule(config)


def _simulated_bubble(schedule: str, stages: int, micro_batches: int, costs) -> Optional[float]:
    """Mean bubble fraction per rank of ``schedule`` in the simulator, or None if it cannot run it."""
    from deepspeed_dualpipe.analysis.simulate import simulate
    try:
        result = simulate(schedule, stages, micro_batches, costs)
    except Exception:  # noqa: BLE001 - an estimate only
        return None
    return statistics.fmean(result.bubble) / result.makespan if result.makespan else None


def _simulated_activations(schedule: str, stages: int, micro_batches: int) -> Optional[List[int]]:
    """The simulator's peak count of live (chunk, micro-batch) units per pipeline rank, or None."""
    from deepspeed_dualpipe.analysis.simulate import simulate
    try:
        return simulate(schedule, stages, micro_batches).peak_activations
    except Exception:  # noqa: BLE001 - shown beside the measurement only
        return None


def _layout(schedule: str, stages: int, micro_batches: int):
    from deepspeed_dualpipe.schedule import get_spec
    return get_spec(schedule).layout(stages, micro_batches)


def _gather(obj):
    """Every rank's ``obj``, on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")


def _rank_state(engine) -> Dict[str, torch.Tensor]:
    """This rank's weights by name; expert ``i`` of expert-parallel rank ``e`` renamed to its index in the whole
    layer (``e * local experts + i``), so that the ranks' shards fit together into one model."""
    offset = 0
    for module in engine.module.modules():
        moe = getattr(module, "deepspeed_moe", None)
        if moe is not None and getattr(moe, "ep_size", 1) > 1 and getattr(moe, "ep_group", None) is not None:
            import torch.distributed as dist
            offset = dist.get_rank(group=moe.ep_group) * moe.num_local_experts
            break
    return {
        _EXPERT.sub(lambda m: f"{m[1]}{int(m[2]) + offset}{m[3]}", name): t.detach().float().cpu().clone()
        for name, t in engine.module.state_dict().items()
    }


def gather_local_model(engine, lm: LMConfig) -> Optional[LocalModel]:
    """All stages' weights on rank 0, loaded into a one-process :class:`LocalModel` (None on other ranks).

    Copies of a stage (data parallelism, DualPipe's mirror) are identical after a step, so the
    first one found is used.
    """
    states = _gather(_rank_state(engine))
    if states is None:
        return None
    merged: Dict[str, torch.Tensor] = {}
    for state in states:
        for name, tensor in state.items():
            merged.setdefault(name, tensor)
    torch.manual_seed(lm.seed)
    local = LocalModel(layer_specs(replace(lm.model, ep_size=1)))  # every expert in this one process
    wanted = local.state_dict()
    missing = sorted(set(wanted) - set(merged))
    if missing:
        raise RuntimeError(f"no pipeline rank holds {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    local.load_state_dict({name: merged[name].to(wanted[name].dtype) for name in wanted})
    return local.eval()


def _parameters(engine) -> int:
    return sum(p.numel() for p in engine.module.parameters())


def evaluate(engine, batches: List) -> float:
    return statistics.fmean(float(engine.eval_batch(iter(b))) for b in batches)


def train(config: Dict, lm: LMConfig, args=None) -> Optional[dict]:
    """Run the job in this rank (``deepspeed.init_distributed`` done); returns the metrics on rank 0."""
    import deepspeed
    import torch.distributed as dist
    wall_start = time.perf_counter()
    rank = dist.get_rank()
    schedule = _schedule_name(config)
    engine = build_engine(config, lm, args)
    P = engine.num_stages
    M = engine.micro_batches  # (the MoE aux losses are scaled like the loss by the engine, see runtime/autograd/aux_loss.py)
    dp_rank, dp_size = engine.grid.get_data_parallel_id(), engine.grid.get_data_parallel_world_size()
    corpus = D.corpus()
    train_tokens, val_tokens = D.split(corpus, lm.block_size, lm.val_every)
    batches = D.Batches(train_tokens, val_tokens, lm.seq_len, engine.train_micro_batch_size_per_gpu(), M, dp_rank,
                        dp_size, lm.seed)
    val_batches = batches.val_batches(lm.eval_batches)
    tokens_per_step = batches.global_batch * lm.seq_len
    params = _gather(_parameters(engine))
    param_bytes = _gather(MEM.parameter_bytes(engine.module))
    memory_step = _memory_step(lm)
    priming_step = _priming_step(lm, memory_step)
    meter = MEM.MemoryMeter(engine)
    activations = None  # on rank 0: every rank's StepMemory.as_dict() (runtime/memory.py) and pipeline rank
    sim_units = _simulated_activations(schedule, P, M)  # live (chunk, micro-batch) units per pipeline rank
    from deepspeed_dualpipe.analysis.symbolic import Costs
    table_costs = Costs(F=1.0, B=2.0, W=1.0)  # the report's Table 2 ratios; pairs run back to back (F&B = F+B)
    bubble_estimate = _simulated_bubble(schedule, P, M, table_costs)
    ep = lm.model.ep_size
    layout = _layout(schedule, P, M)
    holders = sorted({
        r
        for r in range(P)
        for c in range(layout.chunks_per_rank) if layout.model_stage(r, c) in (0, layout.model_stages - 1)
    })
    _log(
        rank, f"[lm] schedule={schedule} engine={type(engine).__name__} pipeline P={P} data-parallel DP={dp_size} "
        f"expert-parallel EP={ep} micro-batches M={M} x {engine.train_micro_batch_size_per_gpu()} x "
        f"{lm.seq_len} bytes; {tokens_per_step} tokens/step; blocks={lm.model.num_layers} "
        f"({_block_kinds(lm.model)}) hidden={lm.model.hidden_size}; embedding and tied head on pipeline "
        f"rank(s) {holders}; parameters per rank {params if params else ''}")
    _log(
        rank, f"[lm] corpus pydoc_data.topics: {len(corpus)} bytes ({D.fingerprint(corpus)}), train "
        f"{len(train_tokens)}, validation {len(val_tokens)}; simulated bubble "
        f"{_percent(bubble_estimate)} of a step with Table 2 costs F=1 B=2 W=1")

    losses, step_times, val_losses = [], [], []
    traced: Optional[List[List[TL.Record]]] = None
    everyone: Optional[list] = None
    measured_costs: Dict[str, float] = {}
    bubble_source = "Table 2 costs"
    measured_bubble: Optional[float] = None
    interval_start, interval_steps = time.perf_counter(), 0
    for step in range(lm.steps):
        trace_now = step == lm.trace_step
        if trace_now:
            start_recording(engine)
            dist.barrier()
        t0 = time.perf_counter()
        if step == priming_step:
            meter.prime()
        if step == memory_step:
            loss = float(meter.measure(lambda: engine.train_batch(data_iter=batches.train_iter(step))))
            activations = _gather({
                **meter.result.as_dict(), "pipeline_rank": engine.stage_id,
                "primed": priming_step is not None
            })
            if activations:
                units = "-" if sim_units is None else [sim_units[a["pipeline_rank"]] for a in activations]
                _log(
                    rank, f"[lm] step {step + 1:4d}/{lm.steps} | memory per rank at the allocator: peak "
                    f"activations {_mib(a['peak'] for a in activations)}, left after the step "
                    f"{_mib(a['left'] for a in activations)}, parameters {_mib(param_bytes)} (MiB); simulated "
                    f"live (chunk, micro-batch) units {units}")
        else:
            loss = float(engine.train_batch(data_iter=batches.train_iter(step)))
        step_times.append(time.perf_counter() - t0)
        losses.append(loss)
        interval_steps += 1
        if trace_now:
            resolve_recording(engine)  # on CUDA: the recorded events, read once
            mine = TL.records(engine.trace, t0, layout, engine.stage_id)
            phases = phase_records(engine, t0)
            stop_recording(engine)
            gathered = _gather((engine.stage_id, dp_rank, mine, phases))
            if gathered is not None:
                everyone = gathered  # by global rank: (pipeline stage, data-parallel rank, records, MoE phases)
                # The pipeline of data-parallel rank 0, in stage order.
                traced = [g[2] for g in sorted((g for g in gathered if g[1] == 0), key=lambda g: g[0])]
                measured_costs = TL.mean_costs(traced)
                costs = TL.simulator_costs(measured_costs)
                estimate = _simulated_bubble(schedule, P, M, costs) if costs else None
                if estimate is not None:
                    bubble_estimate, bubble_source = estimate, "measured costs"
                measured_bubble = statistics.fmean(TL.bubbles(traced))
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss}")
        last = step == lm.steps - 1
        if rank == 0 and (step % lm.print_interval == 0 or last):
            elapsed = time.perf_counter() - interval_start
            lr = engine.get_lr()[0] if engine.get_lr() else float("nan")
            print(f"[lm] step {step + 1:4d}/{lm.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"{tokens_per_step * interval_steps / elapsed:7.0f} tokens/s | "
                  f"{1e3 * elapsed / interval_steps:6.0f} ms/step | bubble {_percent(bubble_estimate)} simulated "
                  f"({bubble_source})" + ("" if measured_bubble is None else
                                          f", {_percent(measured_bubble)} measured (step {lm.trace_step + 1})"),
                  flush=True)
            interval_start, interval_steps = time.perf_counter(), 0
        if (lm.eval_interval and (step + 1) % lm.eval_interval == 0) or last:
            val = evaluate(engine, val_batches)
            val_losses.append({"step": step + 1, "loss": val})
            _log(
                rank, f"[lm] step {step + 1:4d}/{lm.steps} | validation loss {val:.4f} "
                f"({val / math.log(2):.3f} bits/byte)")
            interval_start, interval_steps = time.perf_counter(), 0

    local = gather_local_model(engine, lm)
    wall_seconds = time.perf_counter() - wall_start
    if rank != 0:
        return None

    prompt = D.encode(lm.sample_prompt)
    sample = D.decode(local.generate(prompt, lm.sample_tokens, lm.seq_len, lm.sample_temperature, lm.seed))
    print(f"[lm] sample (temperature {lm.sample_temperature}, seed {lm.seed}):\n{lm.sample_prompt}{sample}\n",
          flush=True)
    # Step time without the first steps (warm-up), the traced one and those of the memory measurement.
    steady = [
        t for i, t in enumerate(step_times)
        if i >= min(3,
                    len(step_times) - 1) and i not in (lm.trace_step, priming_step, memory_step)
    ] or step_times
    step_s = statistics.median(steady)
    metrics = {
        "name": lm.name,
        "schedule": schedule,
        "engine": type(engine).__name__,
        "world_size": dist.get_world_size(),
        "pipeline_stages": P,
        "data_parallel": dp_size,
        "expert_parallel": ep,
        "micro_batches": M,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "seq_len": lm.seq_len,
        "tokens_per_step": tokens_per_step,
        "blocks": _block_kinds(lm.model),
        "parameters_per_rank": params,
        "embedding_and_head_pipeline_ranks": holders,
        "steps": lm.steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "final_val_loss": val_losses[-1]["loss"],
        "val_losses": val_losses,
        "losses": losses,
        "step_s_median": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "wall_seconds": wall_seconds,  # this rank, from before the engine was built to the end of training
        "bubble": {
            "simulated_table2_costs": _simulated_bubble(schedule, P, M, table_costs),
            "simulated_measured_costs": bubble_estimate if bubble_source == "measured costs" else None,
            "measured_per_rank": TL.bubbles(traced) if traced else None,  # pipeline ranks of data-parallel rank 0
            "measured_per_global_rank": TL.bubbles([g[2] for g in everyone]) if everyone else None,
            "measured_step": lm.trace_step if traced else None,
            "measured_step_s": TL.span(traced) if traced else None,
            "measured_costs_s": measured_costs or None,
        },
        "memory": {
            "parameter_bytes_per_rank":
            param_bytes,  # by global rank
            "peak_activation_bytes_per_rank": [a["peak"] for a in activations] if activations else None,
            "peak_activation_after": [a["peak_at"] for a in activations] if activations else None,
            "high_water_bytes_per_rank": [a["high_water"] for a in activations] if activations else None,
            "bytes_left_after_step": [a["left"] for a in activations] if activations else None,
            "simulated_live_units_per_rank":
            [sim_units[a["pipeline_rank"]] for a in activations] if activations and sim_units else None,
            "activation_step":
            memory_step if activations else None,
            "primed": (priming_step is not None) if activations else None,
            "counted":
            "at the allocator (deepspeed_dualpipe/runtime/memory.py): bytes in use after each instruction of "
            "the step beyond what the rank held when it began (parameters, optimizer state) and the "
            "gradients allocated since; left: bytes still in use after the step, gradients excluded",
        },
        "sample": {
            "prompt": lm.sample_prompt,
            "temperature": lm.sample_temperature,
            "seed": lm.seed,
            "text": sample
        },
        "corpus": {
            "source": "pydoc_data.topics",
            "bytes": len(corpus),
            "sha256_16": D.fingerprint(corpus),
            "train_bytes": len(train_tokens),
            "val_bytes": len(val_tokens)
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__
        },
        "config": config,
    }
    write_outputs(metrics, traced, everyone, lm, schedule, P, M)
    return metrics


def _block_kinds(cfg: ModelConfig) -> str:
    dense = cfg.num_layers if cfg.all_dense else min(cfg.dense_layers, cfg.num_layers)
    moe = cfg.num_layers - dense
    text = f"{dense} dense"
    if moe:
        text += (f", {moe} MoE: {cfg.num_experts} experts top-{cfg.top_k}"
                 f"{' + shared expert' if cfg.shared_expert else ''}")
    return text


def _memory_step(lm: LMConfig) -> Optional[int]:
    """The step whose memory is measured: ``lm.memory_step``, by default two after the traced step (the one
    between primes the meter on CPU, see runtime/memory.py, and must not be the traced one)."""
    step = lm.memory_step
    if step is None:
        step = min(max(lm.trace_step, 0) + 2, lm.steps - 1)
    return step if 0 <= step < lm.steps else None


def _priming_step(lm: LMConfig, memory_step: Optional[int]) -> Optional[int]:
    """The step before the measured one, which primes the meter, unless it is the traced one (profiling
    would slow its timeline down) or there is none."""
    if memory_step is None or memory_step == 0 or memory_step - 1 == lm.trace_step:
        return None
    return memory_step - 1


def _mib(values) -> str:
    return "[" + ", ".join(f"{v / 2**20:.2f}" for v in values) + "]"


def _percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def write_outputs(metrics: dict, traced, everyone, lm: LMConfig, schedule: str, P: int, M: int) -> Path:
    out = Path(lm.out_dir) / lm.name
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    try:
        plot_losses(metrics, out / "loss.png")
        written.append(out / "loss.png")
    except RuntimeError as error:  # no matplotlib
        print(f"[lm] no loss curve: {error}", file=sys.stderr)
    if traced:
        layout = _layout(schedule, P, M)
        bubbles = TL.bubbles(traced)
        dp = metrics["data_parallel"]
        title = (
            f"{schedule}  P={P}  M={M}  measured step {lm.trace_step + 1}{' (data-parallel rank 0)' if dp > 1 else ''}"
            f": {1e3 * TL.span(traced):.0f} ms, bubble/rank {_range(bubbles)}")
        names = [
            f"rank {g} (pipeline rank {stage}, data-parallel rank {d})" for g, (stage, d, *_) in enumerate(everyone)
        ]
        TL.write_chrome_trace([g[2] for g in everyone],
                              str(out / "trace.json"), {
                                  "schedule": schedule,
                                  "stages": P,
                                  "micro_batches": M,
                                  "step": lm.trace_step
                              },
                              names,
                              phases=[g[3] for g in everyone])
        written.append(out / "trace.json")
        try:
            TL.plot(traced, layout, str(out / "timeline.png"), title)
            written.append(out / "timeline.png")
            costs = TL.simulator_costs(metrics["bubble"]["measured_costs_s"] or {})
            if costs is not None:
                from deepspeed_dualpipe.analysis.plot import plot_timeline, summary
                from deepspeed_dualpipe.analysis.simulate import simulate
                sim = simulate(schedule, P, M, costs).execution
                plot_timeline(
                    schedule, P, M, costs, str(out / "timeline_simulated.png"),
                    f"{schedule}  P={P}  M={M}  simulated, measured costs F=1 B={costs.B:.2f} "
                    f"W={costs.W:.2f} F&B={costs.pair:.2f}\n{summary(sim)}")
                written.append(out / "timeline_simulated.png")
        except RuntimeError as error:
            print(f"[lm] no timeline picture: {error}", file=sys.stderr)
    metrics["outputs"] = [str(p) for p in written]
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    print(
        f"[lm] first loss {metrics['first_loss']:.4f} -> final validation loss {metrics['final_val_loss']:.4f}; "
        f"{metrics['tokens_per_s']:.0f} tokens/s; wrote {', '.join(str(p) for p in written)}",
        flush=True)
    return out


def _range(values: List[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{100 * lo:.0f}%" if round(100 * lo) == round(100 * hi) else f"{100 * lo:.0f}..{100 * hi:.0f}%"


def plot_losses(metrics: dict, out) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'deepspeed-dualpipe[plot]'") from error
    losses = metrics["losses"]
    steps = list(range(1, len(losses) + 1))
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="#e07b10", linewidth=0.8, alpha=0.5, label="training loss (per step)")
    window = max(1, len(losses) // 25)
    if window > 1:
        smooth = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="#e07b10", linewidth=1.8, label=f"training loss ({window}-step mean)")
    val = metrics["val_losses"]
    ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", color="#1f78b4", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(
        f"{metrics['name']}: {metrics['schedule']}, P={metrics['pipeline_stages']} "
        f"DP={metrics['data_parallel']} EP={metrics['expert_parallel']}, {metrics['tokens_per_step']} "
        f"tokens/step",
        fontsize=10,
        loc="left")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.savefig(out, dpi=120)
