"""Ablations of the demo model: config files with bases, the ablation plan, the report, and a short real ablation whose variants must agree on every loss."""

import json
from pathlib import Path

import pytest

from deepspeed_dualpipe.tools.lm import ablate as A
from deepspeed_dualpipe.tools.lm import config_files
from deepspeed_dualpipe.tools.lm.launch import ROOT

ABLATION = ROOT / "configs" / "ablation.json"


def test_a_config_extends_its_base_section_by_section_and_null_removes_a_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": 1, "dualpipe": {"k": 1}, "lm": {"steps": 5, "seed": 3}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"base": "../a.json", "lm": {"steps": 7}}))
    (tmp_path / "c.json").write_text(json.dumps({"base": "sub/b.json", "dualpipe": None, "y": 2}))
    assert config_files.load(tmp_path / "c.json") == {"x": 1, "y": 2, "lm": {"steps": 7, "seed": 3}}
    (tmp_path / "loop.json").write_text(json.dumps({"base": "loop.json"}))
    with pytest.raises(ValueError, match="its own base"):
        config_files.load(tmp_path / "loop.json")
    (tmp_path / "gone.json").write_text(json.dumps({"base": "nowhere.json"}))
    with pytest.raises(ValueError, match="nowhere.json"):
        config_files.load(tmp_path / "gone.json")


def test_the_ablation_file_has_every_schedule_and_overlap_and_the_variants_differ_only_in_schedule():
    from deepspeed_dualpipe.config import dualpipe_config
    from deepspeed_dualpipe.tools.lm.train import LMConfig
    plan = A.load_plan(ABLATION)
    got = {(v.schedule, v.overlap) for v in plan.variants}
    assert got == {("1f1b", None), ("zb1p", None), ("interleaved-1f1b", None), ("interleaved-1f1b-overlap", True),
                   ("zbv", None), ("ds-dualpipev", None), ("dualpipev", True), ("dualpipev", False),
                   ("dualpipe", True), ("dualpipe", False), ("plugin-1f1b", None)}
    from deepspeed_dualpipe.schedule import SCHEDULES
    assert {v.schedule for v in plan.variants} == set(SCHEDULES)  # every registered schedule
    assert A.differences(plan.variants) == []  # same seed, data, model, optimizer
    for v in plan.variants:
        assert "base" not in v.config and v.config["gradient_clipping"] == 0.0  # see the README: 1f1b's norm
        assert v.config["lm"]["out_dir"] == "runs/ablation" and v.config["lm"]["name"] == v.source.stem
        LMConfig.from_dict(v.config["lm"])
        dualpipe_config(v.config)  # valid for the plugin
    assert {v.source.parent for v in plan.variants} == {ROOT / "configs" / "ablation"}


def test_variants_that_differ_in_more_than_the_schedule_are_named(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"pipeline": {"schedule": "1f1b"}, "lm": {"name": "a", "seed": 1}}))
    (tmp_path / "b.json").write_text(json.dumps({"pipeline": {"schedule": "zb1p"}, "lm": {"name": "b", "seed": 2}}))
    (tmp_path / "ab.json").write_text(json.dumps({"configs": ["a.json", "b.json"], "shared": {"lm": {"steps": 2}}}))
    plan = A.load_plan(tmp_path / "ab.json")
    assert [v.config["lm"]["steps"] for v in plan.variants] == [2, 2]
    assert len(A.differences(plan.variants)) == 1 and "lm.seed = 2" in A.differences(plan.variants)[0]
    (tmp_path / "bad.json").write_text(json.dumps({"configs": ["a.json"], "sharde": {}}))
    with pytest.raises(ValueError, match="sharde"):
        A.load_plan(tmp_path / "bad.json")


def _fake_run(out: Path, name: str, schedule: str, losses):
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(
        json.dumps({
            "engine": "DualPipeEngine",
            "losses": losses,
            "final_loss": losses[-1],
            "final_val_loss": 2.0,
            "tokens_per_s": 1000.0,
            "world_size": 4,
            "pipeline_stages": 2,
            "data_parallel": 2,
            "expert_parallel": 2,
            "micro_batches": 8,
            "micro_batch_size": 4,
            "seq_len": 64,
            "steps": len(losses),
            "blocks": "1 dense",
            "config": {
                "lm": {
                    "seed": 1
                }
            },
            "versions": {
                "torch": "t",
                "deepspeed": "d"
            },
            "bubble": {
                "measured_per_global_rank": [0.1, 0.3, 0.2, 0.2]
            },
            "memory": {
                "peak_activation_bytes_per_rank": [2**20, 2**21, 2**20, 2**21],
                "parameter_bytes_per_rank": [2**20] * 4
            }
        }))


def test_the_report_is_a_table_and_a_plot_of_the_runs_metrics(tmp_path):
    for name, schedule in (("one", "1f1b"), ("two", "dualpipe")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"pipeline": {"schedule": schedule}, "lm": {"name": name}}))
    (tmp_path / "ab.json").write_text(
        json.dumps({
            "configs": ["one.json", "two.json"],
            "out_dir": str(tmp_path / "runs")
        }))
    plan = A.load_plan(tmp_path / "ab.json")
    _fake_run(tmp_path / "runs" / "one", "one", "1f1b", [3.0, 2.0])
    _fake_run(tmp_path / "runs" / "two", "two", "dualpipe", [3.0, 2.0002])
    table = A.report(plan, "python -m deepspeed_dualpipe ablate ab.json")
    assert [r["max_rel_loss_diff"] for r in table] == [0.0, pytest.approx(1e-4)]
    text = (tmp_path / "runs" / "ablation.md").read_text()
    assert "| two | dualpipe | DualPipeEngine | on | 2.000200 |" in text
    assert "20% (10..30%)" in text and "2.00 (1.00..2.00)" in text
    assert (tmp_path / "runs" / "ablation.png").stat().st_size > 0


@pytest.mark.slow
def test_a_short_ablation_runs_every_variant_and_their_losses_agree(tmp_path):
    """1f1b (DeepSpeed's engine), dualpipe, dualpipev and ZB-V, each a launch of its own, train the same tiny MoE model
    for 3 steps on 4 ranks (P=2, DP=2, EP=2): every step's loss agrees to fp32 tolerance. (The other variants of
    configs/ablation train to one process's numbers in tests/distributed; each launch here costs half a minute.)"""
    names = ["1f1b", "dualpipe-overlap", "dualpipev-overlap", "zbv"]
    lm = {"steps": 3, "seq_len": 32, "trace_step": 1, "eval_interval": 0, "eval_batches": 1, "sample_tokens": 0}
    tiny = {
        "gradient_clipping": 0.0,
        "lm": {
            **lm, "model": {
                "hidden_size": 32,
                "num_heads": 2,
                "expert_hidden_size": 64,
                "max_positions": 32
            }
        }
    }
    spec = {
        "ranks": 4,
        "out_dir": str(tmp_path / "runs"),
        "shared": tiny,
        "configs": [str(ROOT / "configs" / "ablation" / f"{n}.json") for n in names]
    }
    (tmp_path / "ablation.json").write_text(json.dumps(spec))
    assert A.main(str(tmp_path / "ablation.json"), timeout=150) == 0
    table = json.loads((tmp_path / "runs" / "ablation.json").read_text())["variants"]
    assert [r["variant"] for r in table] == names and all(r["ran"] for r in table)
    reference = table[0]["losses"]
    for r in table:
        assert len(r["losses"]) == 3
        assert r["losses"] == pytest.approx(reference, rel=1e-5), r["variant"]
        assert r["bubble"] is not None and len(r["activation_bytes_per_rank"]) == 4
        assert min(r["activation_bytes_per_rank"]) > 0 and min(r["parameter_bytes_per_rank"]) > 0
        config = json.loads(Path(r["config"]).read_text())  # complete: reproduces the run alone
        assert "base" not in config and config["lm"]["steps"] == 3
    # DualPipe keeps both mirror copies of its stages: twice the parameters of 1F1B's largest stage, or more.
    by = {r["variant"]: r for r in table}
    assert max(by["dualpipe-overlap"]["parameter_bytes_per_rank"]) > max(by["1f1b"]["parameter_bytes_per_rank"])
    assert (tmp_path / "runs" / "ablation.md").is_file() and (tmp_path / "runs" / "ablation.png").is_file()
