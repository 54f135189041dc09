"""CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron's setting) serialises the overlapped pairs' all-to-alls on CUDA: the
engine warns at start-up, naming the variable, when the schedule has such pairs."""

import types

import pytest

from deepspeed_dualpipe.runtime.cuda_env import has_overlapped_pairs, warn_about_connections


def _engine(schedule, device="cuda", stages=4, micro_batches=8):
    return types.SimpleNamespace(device=device,
                                 schedule_name=schedule,
                                 num_stages=stages,
                                 micro_batches=micro_batches,
                                 stage_id=0)


def test_the_paired_schedules_have_overlapped_pairs_and_zero_bubble_ones_do_not():
    assert has_overlapped_pairs("dualpipe") and has_overlapped_pairs("dualpipev")
    assert not has_overlapped_pairs("zb1p")


def test_one_connection_under_a_paired_schedule_on_cuda_is_warned_about_naming_the_variable(warnings_logged):
    message = warn_about_connections(_engine("dualpipe"), {"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    assert message and [r.getMessage() for r in warnings_logged] == [message]
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in message and "8" in message


@pytest.mark.parametrize("engine, env", [
    (_engine("dualpipe"), {
        "CUDA_DEVICE_MAX_CONNECTIONS": "8"
    }),
    (_engine("dualpipe"), {}),
    (_engine("zb1p"), {
        "CUDA_DEVICE_MAX_CONNECTIONS": "1"
    }),
    (_engine("dualpipe", device="cpu"), {
        "CUDA_DEVICE_MAX_CONNECTIONS": "1"
    }),
])
def test_no_warning_with_more_connections_without_pairs_or_off_cuda(engine, env, warnings_logged):
    assert warn_about_connections(engine, env) is None and not warnings_logged
