"""What every bench rank runs: one engine per schedule, then timed steps, schedules interleaved."""

import itertools
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from deepspeed_dualpipe.bench import layers as L


@dataclass(frozen=True)
class BenchSpec:
    schedules: Tuple[str, ...]
    stages: int
    micro_batches: int
    layers: int
    F: float  # per layer, seconds
    B: float
    W: float
    width: int  # floats per activation sample
    repeats: int
    warmup: int = 1


# One executed instruction: (class name, start, end, waited on peers, time in layers), seconds.
Record = Tuple[str, float, float, float, float]


def _config(spec: BenchSpec, schedule: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": spec.micro_batches,
            "steps_per_print": 10**9, "gradient_clipping": 0.0, "pipeline": {"schedule": schedule}}


def _sgd(params):
    return torch.optim.SGD(params, lr=0.0)  # the weights do not matter; the step still runs


def _engine(spec: BenchSpec, schedule: str):
    import deepspeed_dualpipe
    from deepspeed.pipe import LayerSpec, PipelineModule
    specs = [LayerSpec(L.SleepLayer, spec.F, spec.B, spec.W) for _ in range(spec.layers)]
    model = PipelineModule(layers=specs, num_stages=spec.stages, loss_fn=L.mean_loss, partition_method="uniform")
    engine = deepspeed_dualpipe.initialize(model=model, config=_config(spec, schedule), optimizer=_sgd)[0]
    if hasattr(engine, "trace"):  # the plugin's engine times itself, waits included
        engine.trace = []
    else:
        _time_instructions(engine)
    return engine


def _time_instructions(engine) -> None:
    """DeepSpeed's own engines keep no trace: wrap this instance's instruction table to record one.

    Their point-to-point calls block inside the communication instructions, so no compute
    instruction waits on a peer (``waited`` is 0) and a communication instruction's time is
    waiting and engine time together.
    """
    engine.trace = []

    def timed(kind, execute):
        def run(self, **kwargs):
            start = time.perf_counter()
            execute(self, **kwargs)
            self.trace.append((kind.__name__, start, time.perf_counter(), 0.0))
        return run

    engine._INSTRUCTION_MAP = {kind: timed(kind, fn) for kind, fn in type(engine)._INSTRUCTION_MAP.items()}


def _records(trace, sleeps) -> List[Record]:
    """The trace as plain tuples, each with the layer time that fell inside it (sleeps are nested in
    instructions and both lists are in time order)."""
    out, i = [], 0
    for item in trace:
        name, start, end, waited = item if isinstance(item, tuple) else \
            (type(item.instruction).__name__, item.start, item.end, item.waited)
        while i < len(sleeps) and sleeps[i][1] <= start:
            i += 1
        layer, j = 0.0, i
        while j < len(sleeps) and sleeps[j][0] < end:
            layer += min(sleeps[j][1], end) - max(sleeps[j][0], start)
            j += 1
        out.append((name, start, end, waited, layer))
    return out


def _step(engine, data) -> dict:
    from deepspeed import comm as dist
    engine.trace.clear()
    L.SLEEPS.clear()
    dist.barrier()  # every rank starts the step together
    start = time.perf_counter()
    engine.train_batch(data_iter=data)
    end = time.perf_counter()
    return {"start": start, "end": end, "records": _records(engine.trace, L.SLEEPS)}


def bench_rank(spec: BenchSpec) -> Dict[str, List[dict]]:
    """Per schedule, this rank's measured steps (warm-up steps left out)."""
    torch.manual_seed(0)
    sample = (torch.randn(1, spec.width), torch.zeros(1))
    data = itertools.repeat(sample)  # every rank may load; the same micro-batch each time is enough
    engines = {name: _engine(spec, name) for name in spec.schedules}
    steps = {name: [] for name in spec.schedules}
    for round_ in range(spec.warmup + spec.repeats):  # interleaved: drift hits every schedule alike
        for name, engine in engines.items():
            step = _step(engine, data)
            if round_ >= spec.warmup:
                steps[name].append(step)
    return steps
