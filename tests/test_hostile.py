"""Mistakes a user makes at 2 a.m.: each ends in one line on stderr and exit code 2 (or, where the
mistake is harmless, a correct run), and every file that existed before is byte-identical after.

The workspace: the shipped corpus, a tiny config, a finished 4-step run in run/ (checkpoints at 2
and 4, final/, logs/), and a folder of the user's own, mine/.
"""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smollm2 import cli
from smollm2.files import RunLock
from tests.helpers import CORPUS, ROOT, leftovers, main_refused, snapshot, tiny_config, train_refused

TRAIN = ["--config", "config/tiny.yaml"]


def _set(state: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        state = state[key]
    state[last] = value


def run_python(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, timeout=300)


def one_line(result: subprocess.CompletedProcess, message: bytes) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and b"Traceback" not in result.stderr and message in lines[0], result.stderr


def resume_argv(steps: int, out_dir: str = "run", checkpoint: str = "run/checkpoints/step_4.pt") -> list[str]:
    return [*TRAIN, "--train_steps", str(steps), "--checkpoint_path", checkpoint, "--out_dir", out_dir]


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# Folders we did not write are never replaced


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (".", "holds the run"),  # the folder holding the run
        ("run", "holds the run"),  # the run itself
        ("mine", "did not write (notes.txt)"),  # an unrelated folder
        ("run/final", "is a model folder smollm2 wrote, not a space folder"),
        ("input.txt", "is not a folder"),
    ],
)
def test_export_space_never_replaces_what_it_did_not_write(workspace, capsys, out, message):
    main_refused(capsys, workspace, ["export-space", "--run", "run", "--out", out], message)


def test_export_space_replaces_its_own_folder_whole(workspace):
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0
    (workspace / "space" / "model" / "config.json").unlink()  # what we wrote may be gone: still ours
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0
    assert (workspace / "space" / "model" / "config.json").is_file()
    assert not leftovers(workspace)


def test_export_refuses_a_folder_of_someone_elses_model(workspace, capsys):
    other = workspace / "downloaded"
    other.mkdir()
    (other / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (other / "model-00001-of-00002.safetensors").write_bytes(b"weights")
    argv = ["export", "--checkpoint", "run/checkpoints/step_4.pt", "--out", "downloaded"]
    main_refused(capsys, workspace, argv, "did not write")


def test_export_into_its_own_folder_leaves_no_stale_file(workspace):
    argv = ["export", "--checkpoint", "run/checkpoints/step_2.pt", "--out", "hf"]
    assert cli.main(argv) == 0
    first = (workspace / "hf" / "model.safetensors").read_bytes()
    assert cli.main([*argv[:2], "run/checkpoints/step_4.pt", *argv[3:]]) == 0
    assert (workspace / "hf" / "model.safetensors").read_bytes() != first
    assert (workspace / "hf" / ".smollm2").is_file() and not leftovers(workspace)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["data.path=corpus/a.txt", "data.prepared_dir=corpus"], "holds the corpus itself"),
        (["data.prepared_dir=run"], "is a run folder smollm2 wrote"),
        (["data.prepared_dir=mine"], "did not write (notes.txt)"),
    ],
)
def test_prepared_dir_never_replaces_a_users_folder(workspace, capsys, settings, message):
    (workspace / "corpus").mkdir()
    (workspace / "corpus" / "a.txt").write_text(CORPUS)
    argv = [*TRAIN, "--set", *settings, "--train_steps", "2", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, message)
    main_refused(capsys, workspace, ["prepare", *TRAIN, "--set", *settings], message)


def test_a_hand_edited_meta_json_is_refused_not_rebuilt(workspace, capsys):
    prepared = next((workspace / "run" / "data").iterdir())
    meta = prepared / "meta.json"
    meta.write_text(meta.read_text()[:40])
    main_refused(
        capsys, workspace, ["prepare", *TRAIN, "--out_dir", "run"], "(meta.json, changed since smollm2 wrote it)"
    )


def test_export_space_never_replaces_an_unmarked_project_of_known_names(workspace, capsys):
    project = workspace / "gradio"
    (project / "logs").mkdir(parents=True)
    (project / "README.md").write_text("# my Space\n")
    (project / "app.py").write_text("import gradio\n")
    (project / "logs" / "notes.txt").write_text("what I tried\n")
    main_refused(capsys, workspace, ["export-space", "--run", "run", "--out", "gradio"], "did not write (README.md)")


def test_export_never_replaces_an_unmarked_copy_of_a_published_model(workspace, capsys):
    published = workspace / "SmolLM2-135M-Instruct"
    published.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (published / name).write_bytes(f"{name} of the published model".encode())
    argv = ["export", "--checkpoint", "run/checkpoints/step_4.pt", "--out", str(published.name)]
    main_refused(capsys, workspace, argv, "did not write (config.json)")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: (f / "logs" / "notes.txt").write_text("mine\n"), "did not write (logs/notes.txt)"),
        (lambda f: (f / "model" / "stale.bin").write_bytes(b"old"), "did not write (model/stale.bin)"),
        (lambda f: (f / "app.py").write_text("# my own app\n"), "(app.py, changed since smollm2 wrote it)"),
        (lambda f: (f / "extra").mkdir(), "did not write (extra)"),
    ],
)
def test_export_space_never_replaces_what_the_user_put_in_its_own_folder(workspace, capsys, change, message):
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0
    change(workspace / "space")
    main_refused(capsys, workspace, ["export-space", "--run", "run", "--out", "space"], message)


def test_an_export_copied_elsewhere_is_still_ours_and_a_legacy_one_is_replaced(workspace):
    argv = ["export", "--checkpoint", "run/checkpoints/step_2.pt", "--out"]
    assert cli.main([*argv, "hf"]) == 0
    shutil.copytree(workspace / "hf", workspace / "copy")  # new mtimes, same bytes
    assert cli.main([*argv, "copy"]) == 0
    (workspace / "legacy").mkdir()  # an export of an older smollm2: a marker without a record
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(workspace / "hf" / name, workspace / "legacy" / name)
    (workspace / "legacy" / ".smollm2").write_text('{"kind": "model"}\n')
    assert cli.main([*argv, "legacy"]) == 0
    assert "files" in json.loads((workspace / "legacy" / ".smollm2").read_text())


def test_eval_out_never_replaces_a_file_it_did_not_write(workspace, capsys):
    (workspace / "held.txt").write_text(CORPUS[:600])
    argv = ["eval", "--model", "run/final", "--text", "held.txt", "--window", "32"]
    for out in ("held.txt", "mine/notes.txt", "run/checkpoints/step_4.pt", "run/logs/metrics.jsonl"):
        main_refused(capsys, workspace, [*argv, "--out", out], f"--out {out} exists and is not results")
    assert cli.main([*argv, "--out", "mine/eval.json"]) == 0
    assert cli.main([*argv, "--out", "mine/eval.json"]) == 0  # its own results are replaced
    assert json.loads((workspace / "mine" / "eval.json").read_text())["model"] == "run/final"


def test_prepared_dir_never_holds_the_tokenizer_it_reads(workspace, capsys):
    prepared = workspace / "run" / "data" / "input-320"
    mine = workspace / "mytok"
    mine.mkdir()  # the user's own tokenizer, pretty-printed: bytes no smollm2 wrote
    (mine / "tokenizer.json").write_text(json.dumps(json.loads((prepared / "tokenizer.json").read_text()), indent=4))
    settings = ["data.tokenizer=mytok/tokenizer.json", "data.prepared_dir=mytok"]
    main_refused(capsys, workspace, ["prepare", *TRAIN, "--set", *settings], "holds data.tokenizer itself")
    train_refused(
        capsys, workspace, [*TRAIN, "--set", *settings, "--train_steps", "1", "--out_dir", "x"], "data.tokenizer"
    )
    # A folder smollm2 prepared, read as the tokenizer of another corpus: rebuilding it replaces what it reads.
    (workspace / "other.txt").write_text(CORPUS[::-1])
    tokenizer = "data.tokenizer=run/data/input-320/tokenizer.json"
    settings = ["data.path=other.txt", tokenizer, "data.prepared_dir=run/data/input-320"]
    main_refused(capsys, workspace, ["prepare", *TRAIN, "--set", *settings], "holds data.tokenizer itself")


@pytest.mark.parametrize("out", ["run/data/input-320/m", "run/checkpoints/m", "run/data/m", "run/final/m"])
def test_exports_never_go_inside_a_part_of_a_run(workspace, capsys, out):
    export = ["export", "--checkpoint", "run/checkpoints/step_2.pt", "--out", out]
    main_refused(capsys, workspace, export, "inside")
    main_refused(capsys, workspace, ["export-space", "--run", "run", "--out", out], "inside")


def test_a_reusable_prepared_folder_with_a_stranger_in_it_is_reused_not_refused(workspace, capsys):
    assert cli.main(["prepare", *TRAIN, "--out_dir", "run"]) == 0  # the workspace's corpus lies elsewhere
    (workspace / "run" / "data" / "input-320" / "sub").mkdir()
    (workspace / "run" / "data" / "input-320" / "sub" / "notes.txt").write_text("mine\n")
    before = snapshot(workspace / "run" / "data")
    assert cli.main(["prepare", *TRAIN, "--out_dir", "run"]) == 0, capsys.readouterr().err
    assert "reusing" in capsys.readouterr().out
    assert cli.train_main(resume_argv(1)) == 0
    assert snapshot(workspace / "run" / "data") == before
    # Were it to be rebuilt, the stranger is named, and no key the user did not set.
    line = main_refused(capsys, workspace, ["prepare", *TRAIN, "--set", "data.val_fraction=0.2", "--out_dir", "run"],
                        "did not write (sub)")  # fmt: skip
    assert "data.prepared_dir" not in line


def test_export_never_replaces_the_final_model_of_a_run(workspace, capsys):
    assert cli.train_main([*TRAIN, "--train_steps", "2", "--out_dir", "other"]) == 0
    export = ["export", "--checkpoint", "other/checkpoints/step_2.pt", "--out"]
    main_refused(capsys, workspace, [*export, "run/final"], "is part of the run")
    shutil.copytree(workspace / "run", workspace / "run.bak")  # a copy, marker and all
    main_refused(capsys, workspace, [*export, "run.bak/final"], "is part of the run")
    shutil.copytree(workspace / "run" / "final", workspace / "kept")  # its final model, kept aside
    main_refused(capsys, workspace, [*export, "kept"], "final model of another run")


def test_the_makefile_deletes_nothing():
    # `make clean` was `rm -rf runs/demo`: whatever the user kept there. Nothing can prove a whole run
    # folder ours (its logs are not recorded), and the demo continues the run it finds: no clean target.
    recipes = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("\t")]
    assert not [line for line in recipes if line.startswith(("rm ", "rmdir ")) or " rm -" in line], recipes


# ---------------------------------------------------------------------------------------------
# A run never writes over another run, or into a part of one


def test_a_fresh_run_into_a_run_folder_is_refused(workspace, capsys):
    line = train_refused(capsys, workspace, [*TRAIN, "--train_steps", "2", "--out_dir", "run"], "already holds a run")
    assert "--checkpoint_path run/checkpoints/step_4.pt" in line and "--out_dir" in line


def test_resuming_an_older_checkpoint_over_newer_ones_is_refused(workspace, capsys):
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", "run/checkpoints/step_2.pt", "--out_dir", "run"]
    train_refused(capsys, workspace, argv, "holds checkpoints past step 2 (step_4.pt)")


def test_continuing_one_run_into_another_runs_folder_is_refused(workspace, capsys):
    assert cli.train_main([*TRAIN, "--train_steps", "2", "--out_dir", "other"]) == 0
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "other"]
    train_refused(capsys, workspace, argv, "holds another run")


def test_a_second_run_in_a_locked_folder_is_refused(workspace, capsys):
    with RunLock(workspace / "run"):
        argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "run"]
        train_refused(capsys, workspace, argv, "another smollm2 run")
    # The lock goes with its holder: the same command now runs.
    assert cli.train_main(argv) == 0


def test_a_fresh_run_never_overwrites_log_files_it_did_not_write(workspace, capsys):
    (workspace / "project" / "logs").mkdir(parents=True)
    (workspace / "project" / "logs" / "samples.md").write_text("my precious notes\n")
    argv = [*TRAIN, "--train_steps", "2", "--out_dir", "project"]
    train_refused(capsys, workspace, argv, "already holds a run (project/logs/samples.md)")


def test_a_resume_never_rewrites_logs_of_an_unknown_run(workspace, capsys):
    (workspace / "other" / "logs").mkdir(parents=True)
    (workspace / "other" / "logs" / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "other"]
    train_refused(capsys, workspace, argv, "holds logs of an unknown run")


@pytest.mark.parametrize(
    ("out_dir", "message"),
    [("run/final", "is a model folder"), ("run/checkpoints", "is part of the run"), ("run/logs", "part of the run")],
)
def test_a_run_folder_is_never_a_part_of_another(workspace, capsys, out_dir, message):
    resume = ["--checkpoint_path", "run/checkpoints/step_4.pt"]
    train_refused(capsys, workspace, [*TRAIN, "--train_steps", "2", *resume, "--out_dir", out_dir], message)


def test_a_resume_into_a_copy_of_another_run_is_refused(workspace, capsys):
    assert cli.train_main([*TRAIN, "--train_steps", "6", "--out_dir", "other"]) == 0
    copy = workspace / "copy"
    copy.mkdir()
    for entry in (workspace / "run").iterdir():  # cp -r run/* copy: the marker, a dotfile, stays behind
        if not entry.name.startswith("."):
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, copy / entry.name)
    argv = resume_argv(2, "copy", "other/checkpoints/step_6.pt")
    train_refused(capsys, workspace, argv, "holds checkpoints of another run (step_4.pt)")
    shutil.rmtree(copy / "checkpoints")  # its final/ alone still names run's id
    train_refused(capsys, workspace, argv, "holds the model of another run")


def test_a_fresh_run_marks_only_a_folder_it_made_or_an_empty_one(workspace):
    assert cli.train_main([*TRAIN, "--train_steps", "2", "--out_dir", "mine"]) == 0
    assert not (workspace / "mine" / ".smollm2").exists()
    assert (workspace / "mine" / "notes.txt").read_text() == "a week of notes\n"
    (workspace / "empty").mkdir()
    assert cli.train_main([*TRAIN, "--train_steps", "2", "--out_dir", "empty"]) == 0
    assert json.loads((workspace / "empty" / ".smollm2").read_text())["kind"] == "run"
    # The unmarked folder still resumes, and prunes only its own checkpoints.
    (workspace / "mine" / "checkpoints" / "step_1.pt").write_bytes(b"the user's own file")
    argv = resume_argv(4, "mine", "mine/checkpoints/step_2.pt")
    assert cli.train_main([*argv, "--set", "train.keep_last=1"]) == 2  # a step file this run did not write
    os.remove(workspace / "mine" / "checkpoints" / "step_1.pt")
    assert cli.train_main([*argv, "--set", "train.keep_last=1"]) == 0
    assert sorted(p.name for p in (workspace / "mine" / "checkpoints").iterdir()) == ["step_6.pt"]


@pytest.mark.parametrize(
    "out_dir",
    ["run/data/input-320/sub", "run/data/input-320/a/b", "run/final/sub", "run/checkpoints/sub", "run/logs/a/b"],
)
def test_a_run_never_lies_inside_a_part_of_another(workspace, capsys, out_dir):
    train_refused(capsys, workspace, [*TRAIN, "--train_steps", "1", "--out_dir", out_dir], "inside")
    main_refused(capsys, workspace, ["prepare", *TRAIN, "--out_dir", out_dir], "inside")


def test_the_demo_run_twice_deletes_nothing_and_continues_its_own_run(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(save_every=2, eval_every=2)))
    (tmp_path / "input.txt").write_text(CORPUS)
    shutil.copy(ROOT / "train.py", tmp_path)
    demo = tmp_path / "runs" / "demo"
    demo.mkdir(parents=True)
    (demo / "notes.txt").write_text("mine\n")
    (demo / ".smollm2").write_text(
        '{"kind": "run"}\n'
    )  # an older smollm2 marked folders of the user's; the demo rm -rf'd them
    env = os.environ | {"PY": sys.executable, "STEPS": "2", "MORE": "1", "PYTHONPATH": str(ROOT)}
    for _ in range(2):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "demo.sh")], cwd=tmp_path, env=env, capture_output=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert b"continuing it" in result.stdout and b"(step 4)" in result.stdout
    assert (demo / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in (demo / "checkpoints").iterdir()) == ["step_2.pt", "step_3.pt", "step_4.pt"]
    from smollm2.evaluation import evaluate  # lm-eval's import, only here

    length = tiny_config(save_every=2, eval_every=2)["data"]["seq_len"]  # scored at the length it trained on
    step_4 = str(demo / "checkpoints" / "step_4.pt")
    held_out = evaluate(step_4, split="val", precision="fp32")["split"]
    assert (held_out["window"], held_out["stride"]) == (length, length // 2)
    closing = result.stdout.decode().strip().splitlines()[-1]  # the demo ends saying its held-out bits per byte
    assert closing.endswith(f"bits/byte {held_out['bits_per_byte']:.4f}"), closing


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("data.seq_len=16", "data.seq_len=32"),
        ("train.seed=7", "train.seed=1337"),
        ("data.val_fraction=0.2", "data.val_fraction=0.1"),
        ("model.n_layers=3", "model.n_layers=2"),
        ("data.document_mask=true", "data.document_mask=False"),  # what the model sees of its windows
    ],
)
def test_a_resume_that_would_change_the_data_order_is_refused(workspace, capsys, setting, message):
    argv = [*TRAIN, "--set", setting, "--train_steps", "2", "--checkpoint_path", "run/checkpoints/step_4.pt"]
    train_refused(capsys, workspace, [*argv, "--out_dir", "run"], message)


# ---------------------------------------------------------------------------------------------
# Good checkpoints are kept, bad weights never saved


def test_divergence_keeps_every_good_checkpoint_and_saves_no_bad_weights(workspace, capsys):
    good = (workspace / "run" / "checkpoints" / "step_4.pt").read_bytes()
    argv = [*TRAIN, "--train_steps", "10", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "run"]
    code = cli.train_main([*argv, "--set", "train.lr=1e30", "train.schedule_steps=100", "train.keep_last=1"])
    err = capsys.readouterr().err
    assert code == 2 and "not finite for 3 steps in a row" in err.strip().splitlines()[-1]
    assert (workspace / "run" / "checkpoints" / "step_4.pt").read_bytes() == good
    for path in (workspace / "run" / "checkpoints").glob("step_*.pt"):
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values()), path


def test_a_checkpoint_whose_next_step_diverged_never_prunes_a_good_one(workspace, capsys):
    good = (workspace / "run" / "checkpoints" / "step_4.pt").read_bytes()
    settings = ["train.lr=1e30", "train.save_every=1", "train.keep_last=1", "train.schedule_steps=100"]
    code = cli.train_main([*resume_argv(10), "--set", *settings])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "not finite for 3 steps in a row" in last, last
    # step_5's weights are finite (a huge update, clipped), but the step after them is not
    assert "the last good checkpoint is run/checkpoints/step_4.pt" in last, last
    assert (workspace / "run" / "checkpoints" / "step_4.pt").read_bytes() == good
    rows = [json.loads(line) for line in (workspace / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[4]["loss"] + rows[4]["grad_norm"]), rows[4]  # step 5: from step_4's weights
    assert not math.isfinite(rows[5]["loss"] + rows[5]["grad_norm"]), rows[5]  # step 6: from step_5's


def test_final_is_never_replaced_by_non_finite_weights(workspace, capsys):
    final = {name: digest for name, digest in snapshot(workspace).items() if name.startswith("run/final/")}
    code = cli.train_main([*resume_argv(2), "--set", "train.lr=1e39", "train.schedule_steps=100"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "final/ was not written" in last and "run/checkpoints/step_4.pt" in last, last
    after = snapshot(workspace)
    assert all(after.get(name) == digest for name, digest in final.items())
    assert (workspace / "run" / "checkpoints" / "step_4.pt").is_file()


def test_pruning_never_deletes_a_checkpoint_of_another_run(workspace):
    from smollm2.checkpoint import Checkpointer
    from smollm2.config import TrainConfig

    folder = workspace / "run" / "checkpoints"
    other = torch.load(folder / "step_2.pt", weights_only=True) | {"run_id": "another-run"}
    torch.save(other, folder / "step_1.pt")
    (folder / "step_3.pt").write_bytes(b"the user's, named like ours")
    checkpointer = Checkpointer(workspace / "run", TrainConfig(keep_last=1), is_main=True)
    checkpointer.claim(torch.load(folder / "step_4.pt", weights_only=True)["run_id"])
    checkpointer.begin(4)
    checkpointer.confirm()
    assert sorted(p.name for p in folder.iterdir()) == ["step_1.pt", "step_3.pt", "step_4.pt"]


def test_a_run_that_diverged_before_its_first_checkpoint_can_be_retried(workspace, capsys):
    argv = [*TRAIN, "--train_steps", "10", "--out_dir", "fresh"]
    assert cli.train_main([*argv, "--set", "train.lr=1e30", "train.warmup_steps=0", "train.min_lr=0"]) == 2
    assert "no checkpoint was written" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli.train_main(argv) == 0, capsys.readouterr().err


def test_logs_of_a_run_that_left_no_checkpoint_name_no_checkpoint(workspace, capsys):
    (workspace / "killed" / "logs").mkdir(parents=True)  # a run killed (SIGKILL) before its first checkpoint
    (workspace / "killed" / ".smollm2").write_text('{"kind": "run", "run_id": "0123456789abcdef"}\n')
    (workspace / "killed" / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    line = train_refused(capsys, workspace, [*TRAIN, "--train_steps", "1", "--out_dir", "killed"], "no checkpoint")
    assert "--checkpoint_path" not in line and "killed/logs" in line


# ---------------------------------------------------------------------------------------------
# Signals, full disks and killed processes leave nothing half-done


def test_leftovers_of_killed_processes_are_cleaned_and_an_interrupted_swap_is_undone(workspace):
    from smollm2.files import HOST, STAGING, STAGING_PROOF

    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    run = workspace / "run"

    def staging(path: Path, what: str = "tmp") -> Path:  # as a killed process of this host left it, with its proof
        return path.with_name(f".{path.name}.{what}-{dead}-{HOST}-0123456789abcdef")

    for folder in (staging(run / "checkpoints" / "step_6.pt"), staging(run / "final")):
        folder.mkdir()
        (folder / STAGING_PROOF).write_text(json.dumps({"kind": STAGING, "token": "0123456789abcdef"}))
    (staging(run / "checkpoints" / "step_6.pt") / "step_6.pt").write_bytes(b"half a checkpoint")
    (run / "final").rename(staging(run / "final", "old"))  # killed between the two renames of a swap
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "run"]
    assert cli.train_main(argv) == 0
    assert not leftovers(workspace)
    assert (run / "checkpoints" / "step_6.pt").is_file() and (run / "final" / "model.safetensors").is_file()


def test_a_full_disk_is_one_line(workspace, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/checkpoints/.step_6.pt.tmp-1")

    monkeypatch.setattr("smollm2.checkpoint.save_checkpoint", full)
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "run"]
    before = snapshot(workspace)
    assert cli.train_main(argv) == 2
    assert capsys.readouterr().err == "error: run/checkpoints/.step_6.pt.tmp-1: no space left on device\n"
    after = snapshot(workspace)
    assert sorted(after) == sorted(before) and not leftovers(workspace)  # no file more, none less
    changed = sorted(name for name, digest in before.items() if after[name] != digest)
    # Only what the two steps before the failed save wrote: their log rows, and the data folder
    # re-prepared because this copy of the workspace moved the corpus. Checkpoints and final/ untouched.
    assert changed == [
        "run/data/input-320/.smollm2",
        "run/data/input-320/meta.json",
        *("run/logs/loss.png", "run/logs/metrics.jsonl", "run/logs/samples.md"),
    ]


def test_sigterm_during_prepare_exits_with_a_line_and_leaves_no_staging(workspace, capsys, monkeypatch):
    import smollm2.data

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the build")

    monkeypatch.setattr(smollm2.data, "_build", killed)
    before = snapshot(workspace)
    assert cli.main(["prepare", *TRAIN, "--out_dir", "fresh"]) == 143
    assert "terminated" in capsys.readouterr().err
    assert snapshot(workspace) == before and not leftovers(workspace)
    assert not (workspace / "fresh").exists()  # nor the folders it made


@pytest.mark.parametrize("renameat2", [True, False])
def test_a_signal_in_the_middle_of_a_swap_hides_nothing(workspace, capsys, monkeypatch, renameat2):
    import smollm2.files

    argv = ["export", "--checkpoint", "run/checkpoints/step_2.pt", "--out", "hf"]
    assert cli.main(argv) == 0
    before = snapshot(workspace / "hf")
    if not renameat2:  # a kernel or file system without RENAME_EXCHANGE: two renames
        monkeypatch.setattr(smollm2.files, "exchange", lambda a, b: False)
    renames, real = [], Path.rename

    def interrupted(self, target):
        renames.append(self)
        if len(renames) == 2:  # SIGINT between the first rename and the second
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    code = cli.main([*argv[:2], "run/checkpoints/step_4.pt", *argv[3:]])
    assert code == (130 if not renameat2 else 0), capsys.readouterr().err
    assert (snapshot(workspace / "hf") == before) != renameat2 and not leftovers(workspace)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_saves_then_exits_with_the_signal_code(workspace, capsys, monkeypatch, sig, code):
    from smollm2.trainer import Trainer

    real = Trainer.train_step

    def step_then_signal(self):
        row = real(self)
        if row["step"] == 1:
            os.kill(os.getpid(), sig)
        return row

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    assert cli.train_main([*TRAIN, "--train_steps", "3", "--out_dir", "stopped"]) == code
    out = capsys.readouterr().out
    assert "resume with:" in out and (workspace / "stopped" / "checkpoints" / "step_1.pt").is_file()


def test_ctrl_c_during_start_up_leaves_no_logs_and_the_retry_runs(workspace, capsys, monkeypatch):
    import smollm2.metrics

    real = smollm2.metrics.Reporter.header

    def interrupted(self, lines):  # after the logs were opened, before the loop takes over SIGINT
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2.metrics.Reporter, "header", interrupted)
    argv = [*TRAIN, "--train_steps", "2", "--out_dir", "fresh"]
    assert cli.train_main(argv) == 130
    assert "nothing half-written" in capsys.readouterr().err
    assert not (workspace / "fresh" / "logs").exists() and not leftovers(workspace)
    monkeypatch.setattr(smollm2.metrics.Reporter, "header", real)
    assert cli.train_main(argv) == 0, capsys.readouterr().err


def test_a_failed_prepare_leaves_no_empty_folders(workspace, capsys):
    argv = ["prepare", *TRAIN, "--set", "data.path=missing.jsonl", "--out_dir", "new/fresh"]
    main_refused(capsys, workspace, argv, "missing.jsonl")
    assert not (workspace / "new").exists()
    main_refused(capsys, workspace, [*argv[:-1], "mine"], "missing.jsonl")
    assert sorted(p.name for p in (workspace / "mine").iterdir()) == ["notes.txt"]  # the user's folder stays


def test_a_failed_or_interrupted_prepare_leaves_no_empty_folders(workspace, capsys, monkeypatch):
    import smollm2.data

    main_refused(capsys, workspace, ["prepare", *TRAIN, "--out_dir", "missing", "--set", "data.path=no.txt"], "no.txt")
    monkeypatch.setattr(smollm2.data, "_build", interrupt)  # what Ctrl-C raises in the main thread
    assert cli.main(["prepare", *TRAIN, "--out_dir", "sig", "--set", "data.prepared_dir=shared/a/b"]) == 130
    assert not any((workspace / name).exists() for name in ("missing", "sig", "shared")), sorted(workspace.iterdir())


def test_a_data_error_leaves_no_empty_run_folder(workspace, capsys):
    (workspace / "chat.jsonl").write_text('{"content": "hello"}\n')
    argv = [*TRAIN, "--set", "data.path=chat.jsonl", "--train_steps", "2", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, "chat.jsonl:1")
    assert not (workspace / "fresh").exists()


def test_out_dir_or_checkpoints_a_file(workspace, capsys):
    (workspace / "afile").write_text("x")
    train_refused(capsys, workspace, [*TRAIN, "--train_steps", "2", "--out_dir", "afile"], "is a file")
    (workspace / "new").mkdir()
    (workspace / "new" / "checkpoints").write_text("x")
    train_refused(capsys, workspace, [*TRAIN, "--train_steps", "2", "--out_dir", "new"], "is a file")


# ---------------------------------------------------------------------------------------------
# Settings are refused before anything is written


@pytest.mark.parametrize("key", ["train.weight_decay", "train.lr", "train.min_lr", "train.grad_clip"])
@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(workspace, capsys, key, value):
    argv = [*TRAIN, "--set", f"{key}={value}", "--train_steps", "2", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, "must be a finite number")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.norm_eps=nan", "finite number"),
        ("model.init_std=nan", "finite number"),
        ("model.rope_theta=.nan", "finite number"),
        ("train.beta1=1.0", "must be in [0, 1)"),
        ("train.beta2=-0.1", "must be in [0, 1)"),
        ("train.seed=-1", "train.seed"),
        ("train.seed=99999999999999999999", "train.seed"),
        ("model.vocab_size=200", "at least 259"),
        ("train.min_lr=1.0", "above train.lr"),
        ("train.schedule=linear", "not one of cosine, wsd"),
        ("train.prompts=[]", None),
    ],
)
def test_bad_config_values_are_refused_before_anything_is_written(workspace, capsys, setting, message):
    argv = [*TRAIN, "--set", setting, "--train_steps", "2", "--out_dir", "fresh"]
    if message is None:  # no prompts is fine: nothing to predict
        assert cli.train_main(argv) == 0
        return
    train_refused(capsys, workspace, argv, message)
    assert not (workspace / "fresh").exists()


def test_a_prompt_longer_than_the_context_is_refused_before_training(workspace, capsys):
    long_prompt = "ROMEO: " * 200
    argv = [*TRAIN, "--set", f"train.prompts=[{json.dumps(long_prompt)}]", "--train_steps", "2", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, "the prompt is")
    assert not list((workspace / "fresh").rglob("step_*.pt"))


def test_duplicate_yaml_keys_are_refused_naming_the_key(workspace, capsys):
    text = (workspace / "config" / "tiny.yaml").read_text()
    (workspace / "dup.yaml").write_text(text + "model:\n  n_layers: 4\n")
    main_refused(capsys, workspace, ["info", "--config", "dup.yaml"], "duplicate key model")
    (workspace / "dup2.yaml").write_text(text.replace("model:\n", "model:\n  n_layers: 3\n", 1))
    main_refused(capsys, workspace, ["info", "--config", "dup2.yaml"], "duplicate key model.n_layers")


@pytest.mark.parametrize("corpus", ["   \n\t\n", "hi\n"])
def test_a_refused_corpus_with_a_trained_tokenizer_is_one_line(workspace, capsys, corpus):
    (workspace / "tiny.txt").write_text(corpus)
    main_refused(
        capsys, workspace, ["prepare", *TRAIN, "--set", "data.path=tiny.txt", "--out_dir", "fresh"], "data.path"
    )
    assert not (workspace / "fresh").exists()


@pytest.mark.parametrize(
    "path, message",
    [("nothere", "'nothere' does not exist"), ("empty.jsonl", "is empty"), ("mine", "holds no .txt")],
)
def test_a_bad_second_source_fails_before_the_first_is_prepared(workspace, capsys, path, message):
    (workspace / "empty.jsonl").write_text("")
    (workspace / "mine" / "notes.txt").rename(workspace / "mine" / "notes.md")
    sources = f"data.sources=[{{path: input.txt, weight: 1}}, {{path: {path}, weight: 1}}]"
    argv = [*TRAIN, "--set", sources, "--train_steps", "2", "--out_dir", "fresh"]
    err = train_refused(capsys, workspace, argv, f"data.sources[1] ({Path(path).stem}): ")
    assert message in err, err
    assert not (workspace / "fresh").exists()


@pytest.mark.parametrize("workers", ["0", "-3", "100000"])
def test_prepare_workers_out_of_range(workspace, capsys, workers):
    # 100,000 processes of ~425 MiB each would exhaust the machine's memory long before they finish
    argv = ["prepare", *TRAIN, "--out_dir", "fresh", "--workers", workers]
    main_refused(capsys, workspace, argv, "--workers must be between 1 and this machine's")
    assert not (workspace / "fresh").exists()


def test_info_of_a_huge_model_counts_without_building_it(capsys):
    assert cli.main(["info", "--config", str(ROOT / "config/smollm2-135m.yaml"), "--set", "model.n_layers=10**9"]) == 2
    capsys.readouterr()
    huge = ["info", "--config", str(ROOT / "config/smollm2-135m.yaml"), "--set", "model.n_layers=1000000000"]
    assert cli.main(huge) == 2  # 3.5 quadrillion parameters: past the sane bound, refused
    assert "about 3,538,944,028,311,552 parameters, more than 100,000,000,000" in capsys.readouterr().err
    assert cli.main([*huge[:-1], "model.n_layers=20000"]) == 0  # 70.8 billion: counted, never built
    assert capsys.readouterr().out.splitlines()[-1] == f"total parameters: {28_311_552 + 20_000 * 3_540_096 + 576:,}"


# ---------------------------------------------------------------------------------------------
# Files from elsewhere: checkpoints, model folders, tokenizers, corpora


def test_checkpoint_path_a_folder(workspace, capsys):
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "run/checkpoints", "--out_dir", "run"]
    train_refused(capsys, workspace, argv, "is a folder")


def test_hand_made_and_malicious_checkpoints(workspace, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": {}, "step": 1}, workspace / "partial.pt")
    torch.save({"model": Payload()}, workspace / "evil.pt")
    state = torch.load(workspace / "run/checkpoints/step_4.pt", weights_only=True)
    state["config"]["model"]["n_layers"] = "two"
    torch.save(state, workspace / "badconfig.pt")
    cases = {
        "partial.pt": "no optimizer, config, tokenizer_hash, loader",
        "evil.pt": "not a plain-tensor checkpoint",
        "badconfig.pt": "expected int, got 'two'",
    }
    for name, message in cases.items():
        main_refused(capsys, workspace, ["generate", "--checkpoint", name, "--prompt", "a"], message)
        main_refused(capsys, workspace, ["export", "--checkpoint", name, "--out", "hf"], message)
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "partial.pt", "--out_dir", "run"]
    train_refused(capsys, workspace, argv, "no optimizer")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rng", {}, "its rng is not"),
        ("rng.torch", "seed", "its rng is not"),
        ("rng.python", [3], "its rng is not"),
        ("rng.numpy", {"name": "MT19937"}, "its rng is not"),
        ("config.data", "input.txt", "its config.data is not a mapping"),
        ("config.train", 5, "its config.train is not a mapping"),
        ("loader", "step 4", "its loader is not"),
        ("loader", {}, "its loader is not"),
        ("loader.step", "4", "its loader is not"),
        ("optimizer", [], "its optimizer is not"),
        ("optimizer.param_groups", "all", "its optimizer is not"),
        ("optimizer.state", {0: "moments"}, "its optimizer is not"),
        ("model", ["weights"], "its model is not"),
        ("model", {"norm.weight": "ones"}, "its model is not"),
        ("step", 4.5, "its step is not"),
        ("step", -4, "its step is not a whole number of steps, 0 or more"),
        ("schedule_steps", 0, "its schedule_steps is not a whole number of steps, 1 or more"),
        ("loader.batch_size", 0, "its loader is not"),
        ("tokens_seen", "many", "its tokens_seen is not"),
        ("schedule_steps", None, "its schedule_steps is not"),
        ("last_loss", "low", "its last_loss is not"),
        ("run_id", 7, "its run_id is not"),
        ("precision", "fp16", "its precision is not"),
        ("tokenizer_hash", 5, "its tokenizer_hash is not"),
        ("tokenizer", ["vocab"], "its tokenizer is not"),
    ],
)
def test_checkpoint_fields_of_the_wrong_type_are_one_line_before_any_work(workspace, capsys, field, value, message):
    state = torch.load(workspace / "run/checkpoints/step_4.pt", weights_only=True)
    _set(state, field, value)
    torch.save(state, workspace / "odd.pt")
    argv = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "odd.pt", "--out_dir", "run"]
    train_refused(capsys, workspace, argv, message)


def test_parquet_text_of_numbers(workspace, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), workspace / "numbers.parquet")
    argv = ["prepare", *TRAIN, "--set", "data.path=numbers.parquet", "--out_dir", "fresh"]
    main_refused(capsys, workspace, argv, "holds int values, not strings")


def test_malformed_tokenizer_config(workspace, capsys):
    folder = workspace / "tok"
    folder.mkdir()
    shutil.copy(next((workspace / "run" / "data").iterdir()) / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text("{not json")
    argv = ["prepare", *TRAIN, "--set", "data.tokenizer=tok", "--out_dir", "fresh"]
    main_refused(capsys, workspace, argv, "not a valid tokenizer_config.json")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").write_text("{"), "config.json: not valid JSON"),
        (lambda f: (f / "config.json").write_text('{"model_type": "llama"}'), "not a complete Llama config"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 20), "not a readable safetensors file"),
        (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    ],
)
def test_broken_model_folders(workspace, capsys, damage, message):
    damage(workspace / "run" / "final")
    main_refused(capsys, workspace, ["generate", "--model", "run/final", "--prompt", "a"], message)


def test_rows_that_are_not_ours_in_metrics_are_skipped(workspace):
    with open(workspace / "run" / "logs" / "metrics.jsonl", "a") as f:
        f.write('5\n{"loss": 1}\n{"step": "x"}\n')
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "run"]
    assert cli.train_main(argv) == 0
    rows = [json.loads(line) for line in (workspace / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_a_run_folder_given_as_a_model_is_its_final_model(workspace):
    greedy = ["-m", "smollm2", "generate", "--prompt", "ROMEO:", "--max_new_tokens", "8", "--temperature", "0"]
    from_run = run_python(*greedy, "--model", "run", cwd=workspace)
    from_final = run_python(*greedy, "--model", "run/final", cwd=workspace)
    assert from_run.returncode == 0 and from_final.returncode == 0, from_run.stderr
    assert from_run.stdout == from_final.stdout and from_run.stdout.strip()


def test_a_folder_that_is_neither_a_model_nor_a_run(workspace, capsys):
    main_refused(capsys, workspace, ["chat", "--model", "mine"], "model mine: no config.json, final/ or checkpoints")


# ---------------------------------------------------------------------------------------------
# What a user types: generation, chat and the app


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "temperature must be"),
        (["--temperature", "-1"], "temperature must be"),
        (["--repetition_penalty", "0"], "repetition_penalty must be > 0"),
        (["--top_p", "0"], "top_p must be in (0, 1]"),
        (["--top_p", "1.5"], "top_p must be in (0, 1]"),
        (["--top_k", "-1"], "top_k must be >= 0"),
        (["--max_new_tokens", "0"], "max_new_tokens must be at least 1"),
        (["--prompt", "ROMEO: " * 100], "the prompt is"),
    ],
)
def test_bad_generation_flags(workspace, capsys, flags, message):
    argv = ["generate", "--checkpoint", "run/checkpoints/step_4.pt", "--prompt", "ROMEO:", *flags]
    main_refused(capsys, workspace, argv, message)


def test_a_prompt_that_is_not_utf8(workspace):
    argv = ["-m", "smollm2", "generate", "--checkpoint", "run/checkpoints/step_4.pt", "--prompt", b"\xff\xfe"]
    one_line(run_python(*argv, cwd=workspace), b"not valid UTF-8")


def test_app_with_a_port_out_of_range(workspace):
    one_line(run_python(str(ROOT / "app.py"), "--model", "run/final", "--port", "99999", cwd=workspace), b"--port")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_generate_seeds_out_of_range(workspace, capsys, seed):
    argv = ["generate", "--checkpoint", "run/checkpoints/step_4.pt", "--prompt", "a", "--seed", seed]
    main_refused(capsys, workspace, argv, "seed must be in [0, 2**63)")


def test_a_tiny_temperature_is_nearly_greedy_not_a_crash(workspace, capsys):
    argv = ["generate", "--checkpoint", "run/checkpoints/step_4.pt", "--prompt", "ROMEO:", "--max_new_tokens", "5"]
    argv += ["--precision", "fp32"]
    assert cli.main([*argv, "--temperature", "1e-40"]) == 0
    tiny = capsys.readouterr().out
    assert cli.main([*argv, "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out


def test_chat_input_that_is_not_utf8_and_bad_reply_lengths(workspace):
    model = ["--checkpoint", "run/checkpoints/step_4.pt", "--max_new_tokens", "2"]
    chatted = subprocess.run([sys.executable, "-m", "smollm2", "chat", *model], input=b"h\xffi\nhello\n",
                             cwd=workspace, capture_output=True, timeout=300)  # fmt: skip
    assert chatted.returncode == 0 and b"Traceback" not in chatted.stderr, chatted.stderr
    assert b"error: the message is not valid UTF-8 text" in chatted.stderr  # and the chat goes on
    assert chatted.stdout.count(b"assistant> ") == 1
    one_line(run_python("-m", "smollm2", "chat", *model, "--system", b"\xff", cwd=workspace), b"--system is not valid")
    argv = ["-m", "smollm2", "generate", "--chat", *model]
    one_line(run_python(*argv, "--prompt", b"\xff\xfe", cwd=workspace), b"the prompt is not valid UTF-8")
    one_line(run_python(*argv, "--prompt", "hi", "--max_new_tokens", "0", cwd=workspace), b"at least 1, got 0")


# ---------------------------------------------------------------------------------------------
# Messages say what happened, in one line


def test_misleading_messages(workspace, capsys):
    main_refused(capsys, workspace, ["prepare", *TRAIN, "--set", "data.path=/dev/null"], "is not a regular file")
    line = main_refused(capsys, workspace, ["export", "--checkpoint", "run", "--out", "hf"], "is a folder")
    assert "run/checkpoints/step_4.pt" in line
    (workspace / "link").symlink_to(workspace / "mine")
    main_refused(capsys, workspace, ["export-space", "--run", "run", "--out", "link"], "is a symlink")
    argv = ["export-space", "--run", "run", "--out", "space", "--push", "not a repo id"]
    main_refused(capsys, workspace, argv, "is not a Space id")
    assert not (workspace / "space").exists()


def test_a_path_holding_a_newline_is_still_one_line(workspace, capsys):
    err = main_refused(capsys, workspace, ["info", "--config", "no\nsuch\x1b[31m.yaml"], "config file not found")
    assert "no\\nsuch\\x1b[31m.yaml" in err
