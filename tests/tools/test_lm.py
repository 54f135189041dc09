"""The demo job: its data, its model's LayerSpecs, and a short real run through the deepspeed launcher."""

import json
import math

import pytest
import torch

from deepspeed_dualpipe.tools.lm import data as D
from deepspeed_dualpipe.tools.lm.model import LocalModel, ModelConfig, layer_specs, lm_loss, tied_head
from deepspeed.pipe import TiedLayerSpec

# ----- data -----------------------------------------------------------------------------------


def test_the_corpus_is_the_python_topics_text_and_the_split_is_deterministic_and_disjoint():
    data = D.corpus()
    assert len(data) > 100_000 and b"assert" in data
    train, val = D.split(data, block_size=1000, val_every=10)
    train2, val2 = D.split(D.corpus(), block_size=1000, val_every=10)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert len(train) + len(val) == len(data)
    assert abs(len(val) / len(data) - 0.1) < 0.01
    # Validation is every 10th block: block 9 of the text, and not in the training bytes' place.
    assert bytes(val[:1000].tolist()) == data[9000:10000]
    assert bytes(train[9000:10000].tolist()) == data[10000:11000]
    assert train.dtype == torch.int64 and int(train.max()) < D.VOCAB


def test_labels_are_the_next_bytes_and_batches_repeat_for_the_same_step():
    train, val = D.split(D.corpus())
    batches = D.Batches(train, val, seq_len=16, micro_batch_size=3, micro_batches=4)
    step = batches.train_step(7)
    assert len(step) == 4
    for x, y in step:
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
    again = batches.train_step(7)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(step, again))
    assert not torch.equal(batches.train_step(8)[0][0], step[0][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches.val_batches(2)[1], batches.val_batches(2)[1]))


def test_data_parallel_ranks_share_one_global_batch():
    """DP ranks take disjoint parts of the same global batch: the data of a step does not depend on the layout."""
    train, val = D.split(D.corpus())
    one = D.Batches(train, val, seq_len=8, micro_batch_size=2, micro_batches=2, dp_rank=0, dp_size=1)
    two = [
        D.Batches(train, val, seq_len=8, micro_batch_size=1, micro_batches=2, dp_rank=d, dp_size=2) for d in range(2)
    ]
    whole = torch.cat([x for x, _ in one.train_step(3)])
    parts = torch.cat([x for b in two for x, _ in b.train_step(3)])
    assert torch.equal(whole, parts)


# ----- model ----------------------------------------------------------------------------------


def test_the_model_specs_build_and_run_in_one_process():
    cfg = ModelConfig(hidden_size=32, num_heads=4, num_layers=3, dense_layers=1, num_experts=4)
    specs = layer_specs(cfg)
    assert len(specs) == cfg.num_layers + 4  # embedding, positions, blocks, norm, head
    assert isinstance(specs[0], TiedLayerSpec) and isinstance(specs[-1], TiedLayerSpec)
    assert specs[0].key == specs[-1].key and specs[-1].forward_fn is tied_head
    assert [s.module_kwargs["dense"] for s in specs[2:-2]] == [True, False, False]
    torch.manual_seed(0)
    model = LocalModel(specs)
    # The head is the embedding: one parameter, named as a PipelineModule names it.
    assert sum(1 for n, _ in model.named_parameters() if "embed" in n) == 1
    assert "tied_modules.embed.weight" in model.state_dict()
    tokens = torch.randint(0, D.VOCAB, (2, 10))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 10, D.VOCAB)
    loss = lm_loss(logits, torch.randint(0, D.VOCAB, (2, 10)))
    assert abs(float(loss) - math.log(D.VOCAB)) < 1.0  # near uniform at initialisation
    # Causal: the logits at position t do not depend on later bytes.
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % D.VOCAB
    with torch.no_grad():
        assert torch.allclose(model(changed)[:, :6], logits[:, :6], atol=1e-5)


def test_a_few_steps_in_one_process_lower_the_loss_and_generation_is_seeded():
    torch.manual_seed(0)
    model = LocalModel(layer_specs(ModelConfig(hidden_size=32, num_heads=2, num_layers=2)))
    train, val = D.split(D.corpus())
    batches = D.Batches(train, val, seq_len=32, micro_batch_size=8, micro_batches=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        x, y = batches.train_step(step)[0]
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    a = model.generate(D.encode("The "), 20, context=32, seed=3)
    assert a == model.generate(D.encode("The "), 20, context=32, seed=3)
    assert len(a) == 20 and all(0 <= t < D.VOCAB for t in a)


def test_unknown_config_keys_are_errors_that_name_them():
    from deepspeed_dualpipe.tools.lm.train import LMConfig
    with pytest.raises(ValueError, match="hiden_size"):
        LMConfig.from_dict({"model": {"hiden_size": 3}})
    with pytest.raises(ValueError, match="stepz"):
        LMConfig.from_dict({"stepz": 3})


def test_the_demo_config_names_dualpipe_on_four_ranks():
    from deepspeed_dualpipe.tools.lm.launch import ROOT
    from deepspeed_dualpipe.tools.lm.train import LMConfig
    config = json.loads((ROOT / "configs" / "dualpipe_moe.json").read_text())
    assert config["pipeline"]["schedule"] == "dualpipe"
    lm = LMConfig.from_dict(config["lm"])
    assert 4 % lm.pipeline_stages == 0
    layer_specs(lm.model)  # builds


# ----- a real run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_train_with_dualpipe_through_the_launcher_and_write_their_outputs(tmp_path):
    from deepspeed_dualpipe.tools.lm.launch import launch
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": 0.003,
                "torch_adam": True
            }
        },
        "pipeline": {
            "schedule": "dualpipe"
        },
        "lm": {
            "name": "test",
            "out_dir": str(tmp_path / "runs"),
            "pipeline_stages": 2,
            "seq_len": 32,
            "steps": 12,
            "print_interval": 4,
            "eval_interval": 6,
            "eval_batches": 1,
            "trace_step": 2,
            "sample_tokens": 16,
            "model": {
                "hidden_size": 32,
                "num_heads": 2,
                "num_layers": 2,
                "dense_layers": 1,
                "num_experts": 2
            }
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    done = launch(str(path), ranks=2, timeout=240, capture=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = tmp_path / "runs" / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schedule"] == "dualpipe" and metrics["engine"] == "DualPipeEngine"
    assert metrics["pipeline_stages"] == 2 and len(metrics["losses"]) == 12
    assert metrics["final_val_loss"] < metrics["first_loss"] - 0.5
    assert [v["step"] for v in metrics["val_losses"]] == [6, 12]
    assert len(metrics["sample"]["text"]) > 0
    assert len(metrics["bubble"]["measured_per_rank"]) == 2
    trace = json.loads((out / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1} and all({"name", "ts", "dur", "tid"} <= set(e) for e in spans)
    for picture in ("loss.png", "timeline.png", "timeline_simulated.png"):
        assert (out / picture).stat().st_size > 0
    assert "[lm] step" in done.stdout and "validation loss" in done.stdout


# ----- a measured step, without processes ----------------------------------------------------


def _fake_trace(schedule, stages, micro_batches, rebuild=False):
    """Every rank's instruction stream with made-up timings (1 ms per compute, 0.1 ms otherwise)."""
    from deepspeed_dualpipe.runtime.trace import InstructionTime
    from deepspeed_dualpipe.schedule.instructions import COMPUTE
    from deepspeed_dualpipe.runtime.trace import instruction_from
    from deepspeed_dualpipe.schedule import rank_steps
    traces = []
    for steps in rank_steps(schedule, stages, micro_batches):
        t, trace = 10.0, []
        for ins in (i for step in steps for i in step):
            if rebuild:  # as runtime.trace records them
                ins = instruction_from(type(ins), ins.kwargs)
            duration = 1e-3 if isinstance(ins, COMPUTE) or type(ins).__name__ in ("ForwardPass", "BackwardPass") \
                else 1e-4
            trace.append(InstructionTime(ins, t, t + duration, 0.0))
            t += duration
        traces.append(trace)
    return traces


@pytest.mark.parametrize("schedule, rebuild", [("dualpipe", False), ("zb1p", False), ("1f1b", True)])
def test_a_measured_step_becomes_a_timeline_a_chrome_trace_and_bubbles(tmp_path, schedule, rebuild):
    from deepspeed_dualpipe.tools.lm import timeline as TL
    from deepspeed_dualpipe.schedule import get_spec
    P, M = 2, 4
    layout = get_spec(schedule).layout(P, M)
    per_rank = [TL.records(trace, 10.0, layout, r) for r, trace in enumerate(_fake_trace(schedule, P, M, rebuild))]
    for r, rank in enumerate(per_rank):  # every forward the rank owes, once, with its micro-batch recovered
        forwards = sorted((part.chunk, part.micro_batch) for rec in rank if rec.op is not None
                          for part in rec.op.parts() if part.op == "F")
        assert forwards == [(c, m) for c in range(layout.chunks_per_rank) for m in layout.micro_batches_of(r, c)]
    costs = TL.mean_costs(per_rank)
    assert costs["F"] == pytest.approx(1e-3)
    assert all(0 <= b < 1 for b in TL.bubbles(per_rank))
    trace = TL.chrome_trace(per_rank, {"schedule": schedule})
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(P))
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert json.loads(json.dumps(trace)) == trace
    out = TL.plot(per_rank, layout, str(tmp_path / "timeline.png"), schedule)
    assert (tmp_path / "timeline.png").stat().st_size > 0 and out.endswith(".png")
