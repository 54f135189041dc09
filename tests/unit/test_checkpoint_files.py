"""Checkpoint files without processes: ``latest`` is replaced atomically, tags are single directory names,
and a load names what is wrong with a missing, unfinished or damaged checkpoint, or with optimizer state
for another placement."""

import json
import os
import types

import pytest

from deepspeed_dualpipe.checkpoint import (MANIFEST, CheckpointError, check_tag, prepare_load, prepare_save_dir,
                                           read_latest, replaced_dir, staging_dir, write_latest)


def test_latest_is_replaced_atomically_and_leaves_no_temporary_file(tmp_path):
    write_latest(str(tmp_path), "step1")
    write_latest(str(tmp_path), "step2")
    assert read_latest(str(tmp_path)) == "step2"
    assert sorted(os.listdir(tmp_path)) == ["latest"]


def test_tags_that_are_not_one_directory_name_are_refused():
    for tag in ("a/b", "..", "", staging_dir("", "x")):
        with pytest.raises(ValueError, match="cannot be used"):
            check_tag(tag)
    assert check_tag(7) == "7"


def test_the_next_save_undoes_an_interrupted_replacement_and_clears_every_staging_directory(tmp_path):
    old = replaced_dir(str(tmp_path), "step1")
    os.makedirs(old)
    open(os.path.join(old, "layer_00-model_states.pt"), "w").close()
    os.makedirs(staging_dir(str(tmp_path), "step1"))
    os.makedirs(staging_dir(str(tmp_path), "other"))  # debris of another interrupted save
    prepare_save_dir(str(tmp_path), "step2")
    assert os.listdir(tmp_path / "step1") == ["layer_00-model_states.pt"]
    assert sorted(os.listdir(tmp_path)) == sorted(["step1", os.path.basename(staging_dir("", "step2"))])
    assert os.listdir(staging_dir(str(tmp_path), "step2")) == []  # a fresh, empty staging directory


def _fake_engine(schedule="dualpipe", kind="bidirectional", P=4, boundaries=(0, 2, 4, 6, 8)):
    module = types.SimpleNamespace(schedule=schedule, layout_kind=kind, parts=list(boundaries), _num_layers=8)
    grid = types.SimpleNamespace(get_slice_parallel_world_size=lambda: 1, get_data_parallel_world_size=lambda: 1)
    return types.SimpleNamespace(module=module, grid=grid, num_stages=P, optimizer=object())


def _checkpoint(directory, tag="step1", ranks=2, layout=None, files=None):
    path = os.path.join(directory, tag)
    os.makedirs(path)
    for r in range(ranks):
        with open(os.path.join(path, f"mp_rank_{r:02d}_model_states.pt"), "wb") as f:
            f.write(b"x" * (r + 1))
    if layout is not None:
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump({"format": 1, "tag": tag, "layout": layout, "files": files or {}}, f)
    write_latest(directory, tag)
    return path


def test_loading_a_tag_whose_save_was_interrupted_says_so_and_names_latest(tmp_path):
    _checkpoint(str(tmp_path))
    os.makedirs(staging_dir(str(tmp_path), "step2"))
    with pytest.raises(CheckpointError,
                       match=r"'step2' .* was never completed: its save was interrupted.*"
                       r"'latest' names 'step1'"):
        prepare_load(_fake_engine(), str(tmp_path), "step2")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'step3' .* the checkpoints there are \['step1'\]"):
        prepare_load(_fake_engine(), str(tmp_path), "step3")


def test_a_damaged_checkpoint_is_refused_by_its_manifest(tmp_path):
    layout = {
        "schedule": "dualpipe",
        "layout": "bidirectional",
        "pipe_parallel_size": 4,
        "tensor_parallel_size": 1,
        "stage_boundaries": [0, 2, 4, 6, 8]
    }
    _checkpoint(str(tmp_path),
                layout=layout,
                files={
                    "mp_rank_00_model_states.pt": 1,
                    "mp_rank_01_model_states.pt": 5,
                    "layer_00-model_states.pt": 3
                })
    with pytest.raises(CheckpointError,
                       match=r"damaged: mp_rank_01_model_states.pt \(size changed\), "
                       r"layer_00-model_states.pt \(missing\)"):
        prepare_load(_fake_engine(), str(tmp_path))


def test_optimizer_state_loads_only_into_the_placement_it_was_saved_from(tmp_path):
    layout = {
        "schedule": "dualpipe",
        "layout": "bidirectional",
        "pipe_parallel_size": 4,
        "tensor_parallel_size": 1,
        "stage_boundaries": [0, 2, 4, 6, 8]
    }
    _checkpoint(str(tmp_path), ranks=4, layout=layout)
    assert prepare_load(_fake_engine(), str(tmp_path)) == "step1"  # same placement
    other = _fake_engine("dualpipev", "v", 2)
    with pytest.raises(CheckpointError, match="not converted to another placement"):
        prepare_load(other, str(tmp_path))
    assert prepare_load(other, str(tmp_path), load_optimizer_states=False) == "step1"
    assert prepare_load(other, str(tmp_path), load_module_only=True) == "step1"
    # A checkpoint of DeepSpeed's own save (no manifest) is taken as 1F1B at the depth its files tell.
    deepspeed_made = str(tmp_path / "deepspeed")
    _checkpoint(deepspeed_made, ranks=2)
    assert prepare_load(_fake_engine("1f1b", "linear", 2, (0, 4, 8)), deepspeed_made) == "step1"
    with pytest.raises(CheckpointError, match=r"1f1b \(DeepSpeed's save, assumed\) on 2 pipeline ranks"):
        prepare_load(_fake_engine("zb1p", "linear", 4), deepspeed_made)


def test_a_tag_caught_between_the_two_renames_of_its_replacement_loads_its_previous_version(tmp_path):
    os.rename(_checkpoint(str(tmp_path)), replaced_dir(str(tmp_path), "step1"))
    assert prepare_load(_fake_engine(), str(tmp_path), load_optimizer_states=False) == \
        os.path.basename(replaced_dir("", "step1"))


# ----- what a load verifies, and how it says what is wrong -------------------------------------------------------

_LAYOUT = {"schedule": "dualpipe", "layout": "bidirectional", "pipe_parallel_size": 2, "tensor_parallel_size": 1}


def _checksummed(directory):
    """A checkpoint whose manifest records the size and checksum of each of its files."""
    from deepspeed_dualpipe.checkpoint import checksums
    path = _checkpoint(directory, layout=_LAYOUT)
    names = sorted(n for n in os.listdir(path) if n != MANIFEST)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(
            {
                "format": 1,
                "tag": "step1",
                "layout": _LAYOUT,
                "files": {
                    n: os.path.getsize(os.path.join(path, n))
                    for n in names
                },
                "checksums": {
                    n: checksums.of_file(os.path.join(path, n))
                    for n in names
                }
            }, f)
    return path


def test_bytes_overwritten_in_place_are_refused_by_the_checksum_naming_the_file(tmp_path):
    path = _checksummed(str(tmp_path))
    assert prepare_load(_fake_engine(P=2), str(tmp_path), load_optimizer_states=False) == "step1"
    with open(os.path.join(path, "mp_rank_01_model_states.pt"), "r+b") as f:
        f.write(b"y")  # same size, other content
    with pytest.raises(CheckpointError, match=r"content of mp_rank_01_model_states.pt differs from the checksum"):
        prepare_load(_fake_engine(P=2), str(tmp_path), load_optimizer_states=False)


def test_the_checksum_written_while_saving_is_the_checksum_of_the_file(tmp_path):
    import torch
    from deepspeed_dualpipe.checkpoint import checksums
    path = str(tmp_path / "f.pt")
    with open(path, "wb") as f:
        writer = checksums.HashingWriter(f)
        torch.save({"w": torch.arange(100000.0)}, writer)
    assert writer.digest() == checksums.of_file(path)
    assert torch.load(path)["w"][-1] == 99999.0


def test_a_manifest_that_is_not_json_names_itself_and_what_to_do(tmp_path):
    path = _checksummed(str(tmp_path))
    for garbage in (b"{not json", b"\xff\xfe\x00", b"[1, 2]"):
        with open(os.path.join(path, MANIFEST), "wb") as f:
            f.write(garbage)
        with pytest.raises(CheckpointError, match=rf"{MANIFEST} is damaged .*load another checkpoint, or delete"):
            prepare_load(_fake_engine(P=2), str(tmp_path), load_optimizer_states=False)


@pytest.mark.parametrize("content, says", [(b"", "is empty"), (b"\n  \n", "is empty"),
                                           (b"\x00\x01\xff\xfe", "is not text"),
                                           (b"a/../b", "names .a/../b., which is not a checkpoint tag")])
def test_a_latest_that_names_no_tag_is_refused_naming_it_and_what_to_write(tmp_path, content, says):
    _checkpoint(str(tmp_path))
    with open(tmp_path / "latest", "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=rf"latest {says}.*pass tag= explicitly"):
        prepare_load(_fake_engine(), str(tmp_path))
    assert read_latest(str(tmp_path)) in (None, content.decode(errors="replace").strip())  # lenient for messages


def test_a_tag_asked_for_in_a_directory_that_does_not_exist_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint 'step1': .*missing is not a directory"):
        prepare_load(_fake_engine(), str(tmp_path / "missing"), "step1")
    assert prepare_load(_fake_engine(), str(tmp_path / "missing")) is None  # no tag, no latest: DeepSpeed warns


def test_the_plugins_optimizer_files_of_a_chunked_placement_carry_no_param_groups_for_deepspeeds_loader():
    import torch
    from deepspeed_dualpipe.checkpoint import marker
    state = {"module": None, "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1).state_dict()}
    marked = marker.mark(state, {"schedule": "dualpipev", "layout": "v"})
    with pytest.raises(KeyError, match="param_groups"):
        marked["optimizer"]["param_groups"]
    assert "load_optimizer_states=False" in marked["optimizer"]["why"]
    assert marker.unmark(marked) == state
    assert marker.mark(state, {"schedule": "zb1p", "layout": "linear"}) is state  # DeepSpeed's own placement
