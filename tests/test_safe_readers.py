"""Files from elsewhere (a downloaded model folder, a checkpoint, a tokenizer) and a machine that says
no: whatever they hold, each ends in one line on stderr naming the file, exit code 2, and every file
that existed before byte-identical after. The workspace (tests/conftest.py): a finished 4-step run in
run/ (checkpoints at 2 and 4, final/), its config in config/tiny.yaml.
"""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from smollm2 import cli
from smollm2.files import RunLock
from tests.helpers import leftovers, main_refused, one_error_line, run_train, snapshot, train_refused

TRAIN = ["--config", "config/tiny.yaml"]
CHECKPOINT = "run/checkpoints/step_4.pt"


def generate_refused(capsys, workspace, model: str, message: str) -> str:
    flag = "--checkpoint" if model.endswith(".pt") else "--model"
    return main_refused(capsys, workspace, ["generate", flag, model, "--prompt", "ROMEO:"], message)


def model_copy(workspace, name: str = "m"):
    """A copy of the run's final model (a transformers Llama folder), to damage."""
    folder = workspace / name
    shutil.copytree(workspace / "run" / "final", folder)
    return folder


def edit_json(path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def edit_weights(folder, change) -> None:
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors")


def edited_checkpoint(workspace, change, name: str = "edited.pt") -> str:
    state = torch.load(workspace / CHECKPOINT, weights_only=True)
    change(state)
    torch.save(state, workspace / name)
    return name


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit


# ---------------------------------------------------------------------------------------------
# A model folder's JSON: anything it holds is one line naming the file


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", DEEP, "m/config.json: not valid JSON, so not a Llama config (nested too deeply)"),
        (
            "config.json",
            '{"a": ' + DEEP + "}",
            "m/config.json: not valid JSON, so not a Llama config (nested too deeply)",
        ),
        (
            "tokenizer_config.json",
            DEEP,
            "m/tokenizer_config.json: not valid JSON, so not a valid tokenizer_config.json",
        ),
        ("smollm2_config.json", DEEP, "m/smollm2_config.json: not valid JSON, so not a smollm2 model config"),
        ("model.safetensors.index.json", DEEP, "m/model.safetensors.index.json: not valid JSON"),
    ],
)
def test_json_nested_deeper_than_python_recurses_is_one_line(workspace, capsys, file, content, message):
    (model_copy(workspace) / file).write_text(content)
    generate_refused(capsys, workspace, "m", message)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_attention_heads": 0}, "model.n_heads in m/config.json: must be positive, got 0"),
        ({"num_key_value_heads": 0}, "model.n_kv_heads in m/config.json: must be positive, got 0"),
        ({"num_attention_heads": "4"}, "model.n_heads in m/config.json: expected int, got '4'"),
    ],
)
def test_a_llama_config_of_odd_values_is_checked_before_anything_is_computed_from_it(
    workspace, capsys, changes, message
):
    edit_json(model_copy(workspace) / "config.json", **changes)
    generate_refused(capsys, workspace, "m", message)


def test_a_number_too_large_for_a_float_is_one_line(workspace, capsys):
    edit_json(model_copy(workspace) / "config.json", rms_norm_eps=10**400)
    generate_refused(capsys, workspace, "m", "m/config.json: not a complete Llama config (int too large to convert")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: " + DEEP + "\n", "deep.yaml: not a smollm2 config (nested too deeply)"),
        ("".join(" " * depth + "a:\n" for depth in range(3000)), "deep.yaml: not a smollm2 config (nested too deeply)"),
        ("train:\n  lr: 1" + "0" * 400 + "\n", "deep.yaml: not a smollm2 config (int too large to convert to float)"),
    ],
)
def test_a_yaml_config_nested_too_deeply_or_of_a_huge_number_is_one_line(workspace, capsys, text, message):
    (workspace / "deep.yaml").write_text(text)
    main_refused(capsys, workspace, ["info", "--config", "deep.yaml"], message)


# ---------------------------------------------------------------------------------------------
# Sharded weights: the index names files inside the folder, nothing else


def sharded_copy(workspace, shard_name: str):
    """A model copy whose weights an index maps to `shard_name`."""
    folder = model_copy(workspace)
    weights = load_file(folder / "model.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, shard_name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_shard_name_that_is_not_a_string_is_one_line(workspace, capsys):
    sharded_copy(workspace, 5)
    generate_refused(
        capsys, workspace, "m", "m/model.safetensors.index.json: not a safetensors index (a shard file name"
    )


@pytest.mark.parametrize("name", ["../outside.safetensors", "{workspace}/outside.safetensors"])
def test_a_shard_outside_the_folder_is_never_read(workspace, capsys, name):
    shutil.copy(workspace / "run/final/model.safetensors", workspace / "outside.safetensors")
    sharded_copy(workspace, name.format(workspace=workspace))
    generate_refused(capsys, workspace, "m", "is not a file name inside m (absolute, or through ..)")


def test_a_shard_that_links_out_of_the_folder_is_never_read(workspace, capsys):
    shutil.copy(workspace / "run/final/model.safetensors", workspace / "outside.safetensors")
    folder = sharded_copy(workspace, "model-00001-of-00001.safetensors")
    (folder / "model-00001-of-00001.safetensors").symlink_to(workspace / "outside.safetensors")
    generate_refused(capsys, workspace, "m", "m/model-00001-of-00001.safetensors links out of m (to ")


def test_weights_that_link_out_of_the_folder_are_never_read(workspace, capsys):
    folder = model_copy(workspace)
    (folder / "model.safetensors").rename(workspace / "outside.safetensors")
    (folder / "model.safetensors").symlink_to(workspace / "outside.safetensors")
    generate_refused(capsys, workspace, "m", "m/model.safetensors links out of m (to ")


@pytest.mark.parametrize("layout", ["plain", "blobs on another disk", "snapshot named by a link"])
def test_a_hugging_face_cache_snapshot_whose_files_link_into_its_blobs_loads(workspace, layout):
    """The one link out that is read: the hub cache's snapshots/REV/NAME -> ../../blobs/HASH, also where
    blobs/ is itself a link (a cache moved to another disk) or the snapshot is named through a link."""
    repo = workspace / "hub" / "models--someone--tiny"
    snapshot_folder, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot_folder.mkdir(parents=True)
    if layout == "blobs on another disk":
        (workspace / "disk" / "blobs").mkdir(parents=True)
        blobs.symlink_to(workspace / "disk" / "blobs")
    else:
        blobs.mkdir()
    for file in (workspace / "run" / "final").iterdir():
        if file.name != ".smollm2":
            shutil.copy(file, blobs / f"blob-{file.name}")
            (snapshot_folder / file.name).symlink_to(f"../../blobs/blob-{file.name}")
    named = snapshot_folder
    if layout == "snapshot named by a link":
        named = workspace / "my-model"
        named.symlink_to(snapshot_folder)
    argv = ["generate", "--model", str(named), "--prompt", "ROMEO:", "--max_new_tokens", "4"]
    assert cli.main(argv) == 0


# ---------------------------------------------------------------------------------------------
# Weights: every tensor finite floating point numbers of the config's shape, or one line naming it


def test_weights_that_are_not_finite_in_a_model_folder_are_refused_at_load(workspace, capsys):
    edit_weights(model_copy(workspace), lambda w: w["model.norm.weight"].__setitem__(0, float("nan")))
    generate_refused(capsys, workspace, "m", "m: weight norm.weight holds values that are not finite (NaN or infinity)")


def test_weights_that_are_not_finite_in_a_checkpoint_are_refused_at_load(workspace, capsys):
    name = edited_checkpoint(workspace, lambda s: s["model"]["norm.weight"].__setitem__(0, float("inf")))
    generate_refused(capsys, workspace, name, "edited.pt: weight norm.weight holds values that are not finite")
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", name, "--out_dir", "run"]
    train_refused(capsys, workspace, argv, "edited.pt: weight norm.weight holds values that are not finite")


def test_a_weight_of_integers_in_a_model_folder_is_refused_not_cast(workspace, capsys):
    edit_weights(model_copy(workspace), lambda w: w.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    generate_refused(capsys, workspace, "m", "m: weight norm.weight is int32, not floating point")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64])
def test_a_weight_that_is_no_floating_point_tensor_in_a_checkpoint_is_refused(workspace, capsys, dtype):
    name = edited_checkpoint(workspace, lambda s: s["model"].update({"norm.weight": torch.ones(32, dtype=dtype)}))
    dtype_name = str(dtype).removeprefix("torch.")
    generate_refused(capsys, workspace, name, f"edited.pt: weight norm.weight is {dtype_name}, not floating point")


def test_a_weight_of_another_shape_is_named_with_both_shapes(workspace, capsys):
    edit_weights(model_copy(workspace), lambda w: w.update({"model.norm.weight": torch.ones(7)}))
    generate_refused(capsys, workspace, "m", "m: weight norm.weight has shape [7], the config needs [32]")


# ---------------------------------------------------------------------------------------------
# A tokenizer must fit the model it is loaded with


def small_vocab_copy(workspace, rows: int = 64):
    """A consistent model folder (config and weights) of `rows` token rows beside the run's 320-token tokenizer."""
    folder = model_copy(workspace)
    edit_json(folder / "config.json", vocab_size=rows)
    edit_weights(folder, lambda w: w.update({"model.embed_tokens.weight": w["model.embed_tokens.weight"][:rows]}))
    return folder


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "m", "--prompt", "ROMEO: the king"],
        ["eval", "--model", "m", "--text", "input.txt"],
        ["export", "--model", "m", "--format", "gguf", "--out", "m.gguf"],
    ],
)
def test_a_tokenizer_larger_than_the_models_vocab_is_refused_when_the_model_is_loaded(workspace, capsys, argv):
    small_vocab_copy(workspace)
    main_refused(capsys, workspace, argv, "tokenizer m has 320 tokens, more than model.vocab_size=64")


def test_a_checkpoint_whose_tokenizer_is_larger_than_its_vocab_is_refused(workspace, capsys):
    def shrink(state):
        state["config"]["model"]["vocab_size"] = 64
        state["model"]["embed_tokens.weight"] = state["model"]["embed_tokens.weight"][:64].clone()
        state["model"]["lm_head.weight"] = state["model"]["embed_tokens.weight"]

    name = edited_checkpoint(workspace, shrink)
    generate_refused(capsys, workspace, name, "tokenizer edited.pt has 320 tokens, more than model.vocab_size=64")


def test_a_token_id_past_the_models_rows_is_refused(workspace, capsys):
    """320 tokens for 320 rows, but one of them has the id 400: its row does not exist."""
    folder = model_copy(workspace)
    spec = json.loads((folder / "tokenizer.json").read_text())
    token = next(t for t, i in spec["model"]["vocab"].items() if i == 319)
    spec["model"]["vocab"][token] = 400
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    argv = ["export", "--model", "m", "--format", "gguf", "--out", "m.gguf"]
    main_refused(capsys, workspace, argv, f"tokenizer m gives {token!r} the id 400, past model.vocab_size=320")


def test_an_eos_token_the_tokenizer_does_not_have_is_refused(workspace, capsys):
    folder = model_copy(workspace)
    edit_json(folder / "tokenizer_config.json", eos_token="<|not-a-token|>")
    message = "m/tokenizer_config.json: eos_token '<|not-a-token|>' is not a token of m/tokenizer.json"
    main_refused(capsys, workspace, ["export", "--model", "m", "--format", "gguf", "--out", "m.gguf"], message)


# ---------------------------------------------------------------------------------------------
# A checkpoint's loader position: each field by its type and range


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("windows", "many", "loader.windows must be a whole number of windows, 0 or more (below 2**63)"),
        ("windows", -5, "loader.windows must be a whole number of windows"),
        ("windows", 10**30, "loader.windows must be a whole number of windows"),
        ("windows", 1.5, "loader.windows must be a whole number of windows"),
        ("windows", True, "loader.windows must be a whole number of windows"),
        ("windows", None, "loader.windows must be a whole number of windows"),
        ("step", 10**30, "loader.step must be a whole number of micro-batches"),
        ("batch_size", 2**70, "loader.batch_size must be a whole number of windows, 1 or more"),
        ("world_size", 2.0, "loader.world_size must be a whole number of processes, 1 or more"),
        ("seed", -1, "loader.seed must be a whole number, 0 or more"),
        ("data_format", "2", "loader.data_format must be a format version"),
    ],
)
def test_loader_fields_of_the_wrong_type_or_range_are_one_line_before_any_work(
    workspace, capsys, field, value, message
):
    name = edited_checkpoint(workspace, lambda s: s["loader"].update({field: value}))
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", name, "--out_dir", "run"]
    line = train_refused(capsys, workspace, argv, message)
    assert line.startswith("error: edited.pt: not a smollm2 training checkpoint (its loader is not a loader position")


def test_a_loader_without_windows_whose_position_overflows_is_one_line(workspace, capsys):
    def old_loader(state):
        del state["loader"]["windows"]
        state["loader"]["step"] = 2**62

    name = edited_checkpoint(workspace, old_loader)
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", name, "--out_dir", "run"]
    train_refused(capsys, workspace, argv, "loader.step x batch_size x world_size is past 2**63 windows")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("step", 10**30, "its step is not a whole number of steps, 0 or more (below 2**63)"),
        ("tokens_seen", 2**64, "its tokens_seen is not a whole number of tokens"),
        ("last_loss", 10**400, "its last_loss is not a number"),
    ],
)
def test_progress_fields_out_of_range_are_one_line_before_any_work(workspace, capsys, field, value, message):
    name = edited_checkpoint(workspace, lambda s: s.update({field: value}))
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", name, "--out_dir", "run"]
    train_refused(capsys, workspace, argv, message)


def test_a_checkpoint_whose_model_config_is_not_a_model_config_is_refused_at_resume(workspace, capsys):
    name = edited_checkpoint(workspace, lambda s: s["config"]["model"].update({"init_from": 7}))
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", name, "--out_dir", "run"]
    train_refused(capsys, workspace, argv, "model.init_from in edited.pt: expected str, got 7")


def test_an_optimizer_step_count_that_is_not_a_count_is_one_line_before_any_work(workspace, capsys):
    def steps(state):
        for moments in state["optimizer"]["state"].values():
            moments["step"] = torch.tensor([1.0, 2.0])

    name = edited_checkpoint(workspace, steps)
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", name, "--out_dir", "run"]
    train_refused(capsys, workspace, argv, "edited.pt: not a smollm2 training checkpoint (its optimizer is not")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_moments_of_another_shape_never_reach_the_optimizer(workspace, optimizer):
    """A moment of another shape went into the fused AdamW kernel and corrupted the heap (free():
    invalid next size). The state is checked against the optimizer built for the model first."""
    from smollm2.checkpoint import check_optimizer_state
    from smollm2.config import TrainConfig, model_config_from_dict
    from smollm2.errors import UserError
    from smollm2.model import SmolLM2
    from smollm2.trainer import make_optimizer

    state = torch.load(workspace / CHECKPOINT, weights_only=True)
    model = SmolLM2(model_config_from_dict(state["config"]["model"], "the checkpoint"))
    built = make_optimizer(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    saved = built.state_dict() | {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(4.0)}}}
    with pytest.raises(UserError, match=r"exp_avg of parameter 0 has shape \[3\], the parameter \["):
        check_optimizer_state(built, saved, "edited.pt")
    fewer = built.state_dict() | {"param_groups": built.state_dict()["param_groups"][:1]}
    with pytest.raises(UserError, match="its optimizer state does not fit the model"):
        check_optimizer_state(built, fewer, "edited.pt")


def test_a_resume_with_moments_of_another_shape_is_one_line_not_a_corrupted_heap(workspace):
    """The same, as a user meets it: train.py resuming a hand-edited checkpoint, in a process of its own
    (a moment that reached the fused kernel killed the process with free(): invalid next size)."""

    def shrink(state):
        moments = next(iter(state["optimizer"]["state"].values()))
        moments["exp_avg"] = moments["exp_avg"].flatten()[:3].clone()

    name = edited_checkpoint(workspace, shrink)
    before = snapshot(workspace)
    result = run_train(*TRAIN, "--train_steps", "1", "--checkpoint_path", name, "--out_dir", "run", cwd=workspace)
    assert "its optimizer state does not fit the model (exp_avg of parameter" in one_error_line(result)
    assert snapshot(workspace) == before and not leftovers(workspace)


# ---------------------------------------------------------------------------------------------
# A full disk


class FullDisk:
    """A file on a disk with `room` bytes left: the write that goes past them fails with ENOSPC, as
    write(2) does. Everything else is the real file's."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_ones(workspace, capsys, monkeypatch):
    """torch's zip writer turns the ENOSPC of a write into a RuntimeError ("file write failed")."""
    import smollm2.checkpoint

    real_write_atomic = smollm2.checkpoint.write_atomic

    def write_on_a_full_disk(path, content):
        real_write_atomic(path, lambda file: content(FullDisk(file, room=4096)))

    monkeypatch.setattr(smollm2.checkpoint, "write_atomic", write_on_a_full_disk)
    before = snapshot(workspace)
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", CHECKPOINT, "--out_dir", "run"]
    assert cli.train_main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: no space left on device while saving checkpoint run/checkpoints/step_6.pt\n"
    after = snapshot(workspace)
    kept = [name for name in before if name.startswith(("run/checkpoints/", "run/final/"))]
    assert kept and all(after[name] == before[name] for name in kept)
    assert sorted(p.name for p in (workspace / "run/checkpoints").iterdir()) == ["step_2.pt", "step_4.pt"]
    assert not leftovers(workspace)


def test_a_full_disk_while_writing_a_gguf_says_so(workspace, capsys, monkeypatch):
    """numpy's tofile writes the weights with C stdio; a short write there loses its errno
    ("196608 requested and 180576 written"). Here the disk is full at the fd (/dev/full) and in the
    file object alike, a little before the file would end."""
    import gguf.gguf_writer

    assert cli.main(["export", "--model", "run/final", "--format", "gguf", "--out", "whole.gguf"]) == 0
    room = (workspace / "whole.gguf").stat().st_size - 4096
    (workspace / "whole.gguf").unlink()
    full = os.open("/dev/full", os.O_WRONLY)

    class FullDiskFile(FullDisk):
        def fileno(self) -> int:  # where numpy's tofile writes
            return full

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        return FullDiskFile(open(path, mode, *args, **kwargs), room)

    monkeypatch.setattr(gguf.gguf_writer, "open", open_on_a_full_disk, raising=False)
    try:
        argv = ["export", "--model", "run/final", "--format", "gguf", "--out", "mine.gguf"]
        main_refused(capsys, workspace, argv, "error: no space left on device while writing mine.gguf")
    finally:
        os.close(full)
    assert not (workspace / "mine.gguf").exists()


# ---------------------------------------------------------------------------------------------
# A folder a live run is using


def test_a_run_folder_another_live_run_holds_is_refused_as_in_use_not_as_left_behind(workspace, capsys):
    """A live run before its first checkpoint has logs and no checkpoint, like a run killed then."""
    (workspace / "live" / "logs").mkdir(parents=True)
    (workspace / "live" / ".smollm2").write_text('{"kind": "run", "run_id": "0123456789abcdef"}\n')
    (workspace / "live" / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with RunLock(workspace / "live"):
        argv = [*TRAIN, "--train_steps", "1", "--out_dir", "live"]
        line = train_refused(capsys, workspace, argv, "another smollm2 run is using live")
    assert "no checkpoint" not in line
