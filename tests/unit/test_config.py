import json
import logging

import pytest

from deepspeed_dualpipe.config import DualPipeConfig, dualpipe_config


def cfg(schedule=None, **extra):
    config = dict(train_batch_size=8, **extra)
    if schedule is not None:
        config["pipeline"] = {"schedule": schedule}
    return config


def expect_error(config, *fragments):
    with pytest.raises(ValueError) as info:
        dualpipe_config(config)
    for fragment in fragments:
        assert fragment in str(info.value)
    return str(info.value)


def test_schedule_defaults_to_1f1b_and_section_to_documented_values():
    c = dualpipe_config(cfg())
    assert isinstance(c, DualPipeConfig)
    assert c.schedule == "1f1b"
    assert (c.split_backward, c.overlap_moe_a2a, c.p2p_timeout_s, c.verify_schedule) == (True, True, 300.0, True)
    assert c.dualpipe.p2p_timeout_s == 300.0


def test_pipeline_section_without_schedule_means_1f1b():
    assert dualpipe_config({"pipeline": {"stages": 2}}).schedule == "1f1b"


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev", "ds-dualpipev"])
def test_every_registered_schedule_is_accepted(name):
    assert dualpipe_config(cfg(name)).schedule == name


def test_dualpipe_section_values_are_read():
    c = dualpipe_config(
        cfg("dualpipev",
            dualpipe=dict(split_backward=False, overlap_moe_a2a=False, p2p_timeout_s=12.5, verify_schedule=False)))
    assert (c.split_backward, c.overlap_moe_a2a, c.p2p_timeout_s, c.verify_schedule) == (False, False, 12.5, False)


def test_unknown_schedule_names_the_key_and_lists_valid_schedules():
    msg = expect_error(cfg("dualpip"), "pipeline.schedule='dualpip'", "valid:", "dualpipev", "ds-dualpipev")
    assert "Traceback" not in msg and "pydantic" not in msg


def test_non_string_schedule_names_the_key():
    expect_error(cfg(3), "pipeline.schedule=3")


def test_misspelt_dualpipe_key_names_the_key_path_and_valid_keys():
    expect_error(cfg("zb1p", dualpipe={"p2p_timout_s": 5}), "dualpipe.p2p_timout_s is not a valid key",
                 "p2p_timeout_s", "split_backward", "verify_schedule")


@pytest.mark.parametrize("key,value", [("p2p_timeout_s", 0), ("p2p_timeout_s", -1), ("p2p_timeout_s", "soon"),
                                       ("p2p_timeout_s", float("inf")), ("split_backward", "maybe"),
                                       ("verify_schedule", [1]), ("overlap_moe_a2a", {}), ("monitor_interval", 0),
                                       ("monitor_interval", 1.5), ("monitor_memory", "maybe"), ("profile_step", -1),
                                       ("profile_step", "soon"), ("profile_path", 3),
                                       ("recompute_islands", "attention+gate"), ("recompute_islands", [""]),
                                       ("recompute_islands", ["experts", "experts"])])
def test_bad_dualpipe_values_name_the_key_path(key, value):
    expect_error(cfg("dualpipev", dualpipe={key: value}), f"dualpipe.{key}=")


def test_recompute_islands_default_to_none_and_are_read():
    assert dualpipe_config(cfg("dualpipe")).recompute_islands == []
    c = dualpipe_config(cfg("dualpipe", dualpipe={"recompute_islands": ["attention+gate", "shared_expert"]}))
    assert c.recompute_islands == ["attention+gate", "shared_expert"]
    expect_error(cfg("dualpipe", dualpipe={"recompute_islands": ["experts", 1]}), "dualpipe.recompute_islands.1=1",
                 "valid string")


def test_recompute_islands_are_checked_against_the_islands_the_models_layers_declare():
    from types import SimpleNamespace

    from deepspeed.pipe import LayerSpec
    from torch import nn

    from deepspeed_dualpipe.moe import MoETransformerBlock
    from deepspeed_dualpipe.runtime.engine import check_recompute_islands

    model = SimpleNamespace(
        _layer_specs=[nn.Embedding(3, 4), LayerSpec(MoETransformerBlock, 4, 2, 4),
                      nn.Linear(4, 4)])
    assert check_recompute_islands(["attention+gate", "Linear"], model) == {"attention+gate", "Linear"}
    assert check_recompute_islands([], model) == frozenset()
    with pytest.raises(ValueError,
                       match=r"dualpipe.recompute_islands names \['attention'\], which no layer .* "
                       r"attention\+gate"):
        check_recompute_islands(["attention"], model)
    plain = SimpleNamespace(_layer_specs=[nn.Linear(4, 4)])
    with pytest.raises(ValueError, match="no layer of this model runs as phases .* activation_checkpoint_interval"):
        check_recompute_islands(["Linear"], plain)


def test_monitor_and_profile_keys_default_off_and_are_read():
    c = dualpipe_config(cfg("zbv"))
    assert (c.dualpipe.monitor_interval, c.dualpipe.monitor_memory, c.dualpipe.profile_step) == (1, False, None)
    c = dualpipe_config(
        cfg("zbv", dualpipe=dict(monitor_interval=5, monitor_memory=True, profile_step=3, profile_path="p.json")))
    assert (c.dualpipe.monitor_interval, c.dualpipe.monitor_memory, c.dualpipe.profile_step,
            c.dualpipe.profile_path) == (5, True, 3, "p.json")


def test_dualpipe_section_must_be_a_dict():
    expect_error(cfg("dualpipev", dualpipe=True), "'dualpipe'")


def test_pipeline_section_must_be_a_dict():
    expect_error({"pipeline": "dualpipev"}, "'pipeline'")


@pytest.mark.parametrize("schedule", ["1f1b", "ds-dualpipev"])
def test_dualpipe_section_with_a_deepspeed_schedule_warns_but_is_still_validated(schedule, caplog):
    from deepspeed.utils import logger
    logger.propagate, was = True, logger.propagate  # caplog listens on the root logger
    try:
        with caplog.at_level(logging.WARNING):
            assert dualpipe_config(cfg(schedule, dualpipe={"split_backward": False})).schedule == schedule
    finally:
        logger.propagate = was
    assert any("'dualpipe' config section is ignored" in r.getMessage() for r in caplog.records)
    expect_error(cfg(schedule, dualpipe={"split_backwards": False}), "dualpipe.split_backwards")


@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("stage", [2, 3])
def test_plugin_schedules_reject_zero_stage_2_and_3(schedule, stage):
    expect_error(cfg(schedule, zero_optimization={"stage": stage}), f"zero_optimization.stage={stage}", schedule)


@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_plugin_schedules_accept_zero_stage_0_and_1(schedule):
    for stage in (0, 1):
        dualpipe_config(cfg(schedule, zero_optimization={"stage": stage}))


@pytest.mark.parametrize("fp16", [{
    "enabled": True
}, {
    "enabled": True,
    "loss_scale": 1024
}, {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 12,
    "loss_scale_window": 100
}])
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_plugin_schedules_accept_fp16_with_static_or_dynamic_loss_scaling(schedule, fp16):
    # The engine scales the loss as DeepSpeed's fp16 optimizers expect (tests/distributed/test_fp16.py).
    assert dualpipe_config(cfg(schedule, fp16=fp16)).schedule == schedule
    dualpipe_config(cfg(schedule, fp16=fp16, zero_optimization={"stage": 1}))


@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_fp16_lamb_at_zero_0_rejects_clipping_which_would_count_copies_twice(schedule):
    lamb = {"type": "Lamb", "params": {"lr": 1e-3}}
    for clipping in ({}, {"gradient_clipping": 0.5}):  # DeepSpeed clips at 1.0 by default
        expect_error(cfg(schedule, fp16={"enabled": True}, optimizer=lamb, **clipping), "gradient_clipping=", "Lamb",
                     "twice", "gradient_clipping to 0")
    dualpipe_config(cfg(schedule, fp16={"enabled": True}, optimizer=lamb, gradient_clipping=0.0))
    dualpipe_config(cfg(schedule, fp16={"enabled": True}, optimizer={"type": "Adam"}, gradient_clipping=1.0))
    dualpipe_config(cfg(schedule, bf16={"enabled": True}, optimizer=lamb, gradient_clipping=1.0))


@pytest.mark.parametrize("key", ["bf16", "bfloat16"])
@pytest.mark.parametrize("schedule", ["zb1p", "dualpipe", "dualpipev"])
def test_plugin_schedules_accept_bf16(key, schedule):
    dualpipe_config(cfg(schedule, **{key: {"enabled": True}}))


@pytest.mark.parametrize("schedule", ["1f1b", "ds-dualpipev"])
def test_deepspeed_schedules_leave_precision_and_zero_to_deepspeed(schedule):
    dualpipe_config(cfg(schedule, bf16={"enabled": True}, zero_optimization={"stage": 1}))


def test_half_precision_disabled_is_fine_with_plugin_schedules():
    dualpipe_config(cfg("dualpipev", fp16={"enabled": False}, bf16={"enabled": False}))


def test_config_is_read_from_a_json_file_path(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg("zb1p", dualpipe={"p2p_timeout_s": 7})))
    c = dualpipe_config(str(path))
    assert (c.schedule, c.p2p_timeout_s) == ("zb1p", 7.0)


def test_bad_key_in_a_json_file_is_reported_too(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg("dualpip")))
    expect_error(str(path), "pipeline.schedule='dualpip'")


def test_config_that_is_neither_dict_nor_path_is_a_value_error():
    with pytest.raises(ValueError):
        dualpipe_config(42)


@pytest.mark.parametrize("key,value", [("p2p_timeout_s", True), ("p2p_timeout_s", False), ("p2p_timeout_s", "20"),
                                       ("monitor_interval", True), ("monitor_interval", "2"), ("profile_step", "3"),
                                       ("profile_step", False)])
def test_numeric_keys_refuse_booleans_and_strings_which_pydantic_would_convert(key, value):
    expect_error(cfg("dualpipev", dualpipe={key: value}), f"dualpipe.{key}=")


@pytest.mark.parametrize("value", [1e-9, 0.5, 0.999])
def test_a_timeout_below_the_minimum_is_refused_with_its_value(value):
    expect_error(cfg("dualpipev", dualpipe={"p2p_timeout_s": value}), f"{value:g} s is below the minimum 1 s")


def test_the_minimum_timeout_and_integers_are_accepted():
    assert dualpipe_config(cfg("dualpipev", dualpipe={"p2p_timeout_s": 1})).p2p_timeout_s == 1.0
    assert dualpipe_config(cfg("dualpipev", dualpipe={"monitor_interval": 3})).dualpipe.monitor_interval == 3
