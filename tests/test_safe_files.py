"""What smollm2 writes, swaps, cleans and copies touches only what it provably wrote, and follows no link.

- Copies take regular files only: a log, a model file or a package file that is a link (out of the
  run, or anywhere) is refused in one line, and nothing is written (export-space would publish it).
- Staging entries are created exclusively under names no one can guess: a link planted at a staging
  name is never written through, nor deleted; the name handed to a writer that opens by name stays ours
  even when its folder is swapped for a link.
- A file the user adds to (or edits in) one of our folders while it is rebuilt survives the swap: the
  old folder goes back, with one line.
- Leftover cleaning touches only staging entries that prove they are a dead smollm2 process's on this
  host, and only under the names smollm2 writes there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from smollm2 import cli
from smollm2.errors import UserError
from tests.helpers import ROOT, leftovers, main_refused, snapshot

TRAIN = ["--config", "config/tiny.yaml"]
RESUME = [*TRAIN, "--train_steps", "2", "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "run"]
SECRET = b"hf_the_users_token\n"
DEAD = 2**22 + 12345  # above Linux's default pid_max: no such process


def secret(workspace: Path) -> Path:
    """A file outside the run that must never reach a Space (a Hugging Face token, say)."""
    path = workspace / "elsewhere" / "token"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def holds_the_secret(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and SECRET in p.read_bytes()]


def space_refused(capsys, workspace: Path, message: str) -> str:
    line = main_refused(capsys, workspace, ["export-space", "--run", "run", "--out", "space"], message)
    assert not (workspace / "space").exists()
    assert holds_the_secret(workspace) == [str(workspace / "elsewhere" / "token")]
    return line


# ---------------------------------------------------------------------------------------------
# Copies follow no link (export-space: logs, model, package, app.py)


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.md", "loss.png"])
def test_export_space_refuses_a_log_that_links_out_of_the_run(workspace, capsys, name):
    log = workspace / "run" / "logs" / name
    log.unlink()
    log.symlink_to(secret(workspace))
    line = space_refused(capsys, workspace, "is a symlink")
    assert f"run/logs/{name}" in line


def test_export_space_refuses_a_logs_folder_that_links_out_of_the_run(workspace, capsys):
    logs = workspace / "run" / "logs"
    elsewhere = secret(workspace).parent / "logs"
    logs.rename(elsewhere)
    logs.symlink_to(elsewhere)
    space_refused(capsys, workspace, "run/logs is a symlink")


def test_export_space_refuses_a_log_that_is_not_a_regular_file(workspace, capsys):
    samples = workspace / "run" / "logs" / "samples.md"
    samples.unlink()
    os.mkfifo(samples)  # reading it would wait for a writer forever
    secret(workspace)
    line = space_refused(capsys, workspace, "is not a regular file")
    assert "run/logs/samples.md" in line


@pytest.mark.parametrize("name", ["final/tokenizer.json", "final/model.safetensors", "checkpoints/step_4.pt"])
def test_export_space_refuses_a_model_file_that_links_out_of_the_run(workspace, capsys, name):
    """The Space's model/ is written from what export-space reads: a link out of the run would publish
    someone else's weights or tokenizer."""
    run = workspace / "run"
    if name.startswith("checkpoints"):  # a run that never finished: its latest checkpoint is the model
        for path in sorted((run / "final").iterdir()):
            path.unlink()
        (run / "final").rmdir()
    path = run / name
    outside = workspace / "elsewhere" / path.name
    outside.parent.mkdir()
    path.rename(outside)
    path.symlink_to(outside)
    line = main_refused(capsys, workspace, ["export-space", "--run", "run", "--out", "space"], "is a symlink")
    assert f"run/{name}" in line and not (workspace / "space").exists()


def test_export_space_copies_the_package_as_regular_files_only(workspace, capsys, monkeypatch):
    import smollm2.space

    package = workspace / "package" / "smollm2"
    for source in Path(smollm2.space.PACKAGE).glob("*.py"):
        package.parent.mkdir(exist_ok=True)
        package.mkdir(exist_ok=True)
        (package / source.name).write_bytes(source.read_bytes())
    (package / "extra.py").symlink_to(secret(workspace))
    monkeypatch.setattr(smollm2.space, "PACKAGE", package)
    line = space_refused(capsys, workspace, "is a symlink")
    assert "extra.py" in line


def test_export_space_copies_app_py_only_when_it_is_a_regular_file(workspace, capsys, monkeypatch):
    import smollm2.space

    app = workspace / "clone" / "app.py"
    app.parent.mkdir()
    app.symlink_to(secret(workspace))
    monkeypatch.setattr(smollm2.space, "APP_PY", app)
    line = space_refused(capsys, workspace, "is a symlink")
    assert "app.py" in line


def test_the_space_holds_regular_files_only_and_the_same_bytes(workspace):
    import smollm2.space

    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0
    space = workspace / "space"
    assert not [p for p in space.rglob("*") if p.is_symlink()]
    assert (space / "app.py").read_bytes() == smollm2.space.APP_PY.read_bytes()
    assert (space / "smollm2" / "files.py").read_bytes() == (smollm2.space.PACKAGE / "files.py").read_bytes()
    for name in ("metrics.jsonl", "samples.md", "loss.png"):
        assert (space / "logs" / name).read_bytes() == (workspace / "run" / "logs" / name).read_bytes()


def test_a_space_names_its_corpus_by_file_name_never_by_the_folders_above_it(workspace, monkeypatch):
    """--push publishes the Space: the card and run.json say `diary.txt`, not /home/alice/private/diary.txt."""
    import smollm2.space

    private = workspace / "private" / "alice"
    private.mkdir(parents=True)
    (private / "diary.txt").write_text((workspace / "input.txt").read_text())
    argv = ["--config", "config/tiny.yaml", "--train_steps", "2", "--out_dir", "mine_run"]
    assert cli.train_main([*argv, "--set", f"data.path={private / 'diary.txt'}"]) == 0
    assert cli.main(["export-space", "--run", "mine_run", "--out", "space"]) == 0
    published = {p.name: p.read_text() for p in (workspace / "space").iterdir() if p.is_file()}
    assert json.loads(published["run.json"])["data_path"] == "diary.txt"
    assert "`diary.txt`" in published["README.md"]
    assert not [name for name, text in published.items() if str(private) in text or "private" in text]
    mixture = {"data": {"sources": [{"path": str(private / "diary.txt"), "weight": 0.5}]}}
    monkeypatch.setattr(smollm2.space, "last_config", lambda run: mixture)  # a mixture's sources, named the same way
    assert smollm2.space.run_facts(workspace / "mine_run").data_path == "diary.txt x 0.5"


def test_a_resume_refuses_samples_that_link_out_of_the_run(workspace, capsys):
    """A resumed run keeps its samples.md's bytes: through a link they would be another file's, and
    export-space would publish them."""
    samples = workspace / "run" / "logs" / "samples.md"
    samples.unlink()
    samples.symlink_to(secret(workspace))
    assert cli.train_main(RESUME) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {Path('run/logs/samples.md')} is a symlink: refusing to follow it (smollm2 follows no link)"
    assert holds_the_secret(workspace) == [str(workspace / "elsewhere" / "token")] and samples.is_symlink()


def test_a_log_is_appended_to_only_as_a_regular_file(tmp_path):
    from smollm2.files import open_append

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    os.mkfifo(tmp_path / "samples.md")  # no reader: opening it to write would wait forever
    with pytest.raises(UserError, match="metrics.jsonl is a symlink: refusing to follow it"):
        open_append(tmp_path / "metrics.jsonl")
    with pytest.raises(UserError, match="samples.md is not a regular file: refusing to write to it"):
        open_append(tmp_path / "samples.md")
    with open_append(tmp_path / "summary.txt") as f:
        f.write("a row\n")
    assert victim.read_text() == "precious\n" and (tmp_path / "summary.txt").read_text() == "a row\n"


def test_a_file_system_that_reports_another_owner_is_still_written_to(tmp_path, monkeypatch):
    """vfat, SMB or NFS under sudo report one owner for every file: the staging folder is known as the
    one mkdir made by its identity, not by its owner."""
    from smollm2.files import write_atomic

    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    write_atomic(tmp_path / "notes.txt", "kept\n")
    assert (tmp_path / "notes.txt").read_text() == "kept\n" and not leftovers(tmp_path)


RUN_TOKENIZER = SimpleNamespace(hash="0123", id_limit=100)  # named by a hub id in the metadata: compared by name


def datatrove_folder(folder: Path) -> Path:
    """A folder as datatrove's DocumentTokenizer writes it: tokens, document ends, tokenizer name."""
    folder.mkdir()
    (folder / "000.ds").write_bytes(np.arange(100, dtype="<u2").tobytes())
    (folder / "000.ds.index").write_bytes(np.array([50, 100], dtype="<u8").tobytes())
    (folder / "000.ds.metadata").write_text("some/tokenizer|2\n100\n")
    return folder


def test_a_datatrove_folder_is_read_as_it_lies(tmp_path):
    from smollm2.datatrove_io import check_datatrove_folder, read_datatrove_folder

    folder = datatrove_folder(tmp_path / "tokens")
    check_datatrove_folder(folder)
    (train,), val = read_datatrove_folder(folder, RUN_TOKENIZER, "some/tokenizer", 0.5)
    assert train.tolist() == list(range(50)) and val.tolist() == list(range(50, 100))


@pytest.mark.parametrize("name", ["000.ds", "000.ds.metadata", "000.ds.index"])
def test_a_datatrove_file_that_links_out_of_its_folder_is_refused(tmp_path, name):
    from smollm2.datatrove_io import check_datatrove_folder, read_datatrove_folder

    folder = datatrove_folder(tmp_path / "tokens")
    (folder / name).rename(tmp_path / name)
    (folder / name).symlink_to(tmp_path / name)
    for read in (
        lambda: check_datatrove_folder(folder),
        lambda: read_datatrove_folder(folder, RUN_TOKENIZER, "some/tokenizer", 0.5),
    ):
        with pytest.raises(UserError, match=f"^{folder / name} is a symlink: refusing to follow it"):
            read()


# ---------------------------------------------------------------------------------------------
# Staging entries are created exclusively


def plant_links(folder: Path, name: str, victim: Path) -> list[Path]:
    """Links at the staging names `.NAME.tmp-PID` of this process and the next ones, to `victim`."""
    links = [folder / f".{name}.tmp-{pid}" for pid in range(os.getpid(), os.getpid() + 8)]
    for link in links:
        link.symlink_to(victim)
    return links


def test_eval_out_never_writes_through_a_link_planted_at_a_staging_name(workspace):
    shared, victim = workspace / "shared", workspace / "mine" / "notes.txt"
    shared.mkdir()
    links = plant_links(shared, "r.json", victim)
    argv = ["eval", "--model", "run/final", "--text", "input.txt", "--out", "shared/r.json"]
    assert cli.main(argv) == 0
    assert victim.read_text() == "a week of notes\n"
    assert all(link.is_symlink() for link in links)  # not ours: never deleted either
    report = json.loads((shared / "r.json").read_text())
    assert report["format"] == "smollm2-eval/1" and not (shared / "r.json").is_symlink()


def test_a_gguf_export_never_writes_through_a_link_planted_at_a_staging_name(workspace):
    pytest.importorskip("gguf")
    shared, victim = workspace / "shared", workspace / "mine" / "notes.txt"
    shared.mkdir()
    links = plant_links(shared, "m.gguf", victim)
    argv = ["export", "--model", "run/final", "--format", "gguf", "--out", "shared/m.gguf"]
    assert cli.main(argv) == 0
    assert victim.read_bytes() == b"a week of notes\n"
    assert all(link.is_symlink() for link in links)
    assert (shared / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_a_build_never_deletes_what_lies_at_its_staging_name(workspace):
    planted = workspace / f".hf.tmp-{os.getpid()}"
    planted.mkdir()
    (planted / "keep.txt").write_text("the user's\n")
    assert cli.main(["export", "--checkpoint", "run/checkpoints/step_4.pt", "--out", "hf"]) == 0
    assert (planted / "keep.txt").read_text() == "the user's\n"
    assert (workspace / "hf" / "model.safetensors").is_file()


def test_a_staging_name_already_taken_is_passed_over_not_replaced(tmp_path, monkeypatch):
    import smollm2.files as files

    tokens = iter(["0123456789abcdef", "fedcba9876543210"])
    monkeypatch.setattr(files, "staging_token", lambda: next(tokens))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    taken = files.staging_name(tmp_path / "out.json", "0123456789abcdef")
    taken.symlink_to(victim)
    files.write_atomic(tmp_path / "out.json", "ours\n")
    assert victim.read_text() == "precious\n" and taken.is_symlink()
    assert (tmp_path / "out.json").read_text() == "ours\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([taken.name, "out.json", "victim.txt"])


def test_the_name_a_writer_opens_stays_ours_when_its_folder_is_swapped_for_a_link(tmp_path):
    """staged_file yields a name for writers that open by name (gguf): another user who can write the
    folder swaps the staging folder for a link to theirs, holding a link to a victim; nothing reaches it."""
    from smollm2.files import staged_file

    victim, theirs = tmp_path / "victim.txt", tmp_path / "theirs"
    victim.write_text("precious\n")
    theirs.mkdir()
    (theirs / "m.gguf").symlink_to(victim)
    target = tmp_path / "m.gguf"
    with staged_file(target) as name:
        (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf.tmp-")]
        staging.rename(tmp_path / "moved")
        staging.symlink_to(theirs)
        with open(name, "wb") as f:
            f.write(b"ours")
    assert victim.read_text() == "precious\n"
    assert target.read_bytes() == b"ours" and not target.is_symlink()
    assert staging.is_symlink()  # not ours: left as it is


def test_staged_files_get_the_umask_mode(tmp_path):
    from smollm2.files import write_atomic

    umask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------------------------------------
# A file the user puts into one of our folders while it is rebuilt survives the swap


def add_notes(target: Path):
    def change() -> None:
        (target / "notes.txt").write_text("written during the build\n")

    return change


def edit_config(target: Path):
    def change() -> None:
        name = "config.json" if (target / "config.json").is_file() else "meta.json"
        with open(target / name, "a") as f:
            f.write("\n")

    return change


def rebuild_with_a_change(workspace, monkeypatch, command: str, change_for) -> tuple[Path, list[str]]:
    """The folder a command rebuilds, and its argv; `change_for(target)` runs while it is being built."""
    import smollm2.data
    import smollm2.hf
    import smollm2.space

    if command == "export":
        target, argv = workspace / "hf", ["export", "--checkpoint", "run/checkpoints/step_4.pt", "--out", "hf"]
        module, name = smollm2.hf, "save_pretrained"
    elif command == "export-space":
        target, argv = workspace / "space", ["export-space", "--run", "run", "--out", "space"]
        module, name = smollm2.space, "save_pretrained"
    else:
        target = next((workspace / "run" / "data").iterdir())
        argv = ["prepare", *TRAIN, "--out_dir", "run"]
        module, name = smollm2.data, "_build"
    if command != "prepare":  # the workspace's prepared data is rebuilt anyway: this copy moved its corpus
        assert cli.main(argv) == 0  # the folder, ours
    real, change = getattr(module, name), change_for(target)

    def build(*args, **kwargs):
        result = real(*args, **kwargs)
        change()
        return result

    monkeypatch.setattr(module, name, build)
    return target, argv


@pytest.mark.parametrize("renameat2", [True, False])
@pytest.mark.parametrize("command", ["export", "export-space", "prepare"])
@pytest.mark.parametrize("change_for", [add_notes, edit_config])
def test_a_file_the_user_adds_or_edits_during_a_rebuild_survives_it(
    workspace, capsys, monkeypatch, command, change_for, renameat2
):
    import smollm2.files

    if not renameat2:
        monkeypatch.setattr(smollm2.files, "exchange", lambda a, b: False)
    target, argv = rebuild_with_a_change(workspace, monkeypatch, command, change_for)
    before = snapshot(workspace)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "smollm2 did not write" in err and str(target.relative_to(workspace)) in err, err
    after = snapshot(workspace)
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    name = "notes.txt" if change_for is add_notes else ("config.json" if command == "export" else None)
    if change_for is add_notes:
        assert changed == [str((target / "notes.txt").relative_to(workspace))]
        assert (target / "notes.txt").read_text() == "written during the build\n"
    else:  # the edit stays, and so does every other file of the old folder
        assert len(changed) == 1 and changed[0].startswith(str(target.relative_to(workspace))), changed
        assert name is None or changed[0].endswith(name)
    assert not leftovers(workspace)


# ---------------------------------------------------------------------------------------------
# Leftover cleaning touches only what a dead smollm2 process of this host provably left


def test_a_resume_leaves_the_users_files_named_like_leftovers_alone(workspace):
    run = workspace / "run"
    users = {
        run / "checkpoints" / f".step_6.pt.tmp-{DEAD}": b"the user's, named like an old staging file",
        run / "logs" / f".notes.tmp-{DEAD}": b"a user's editor swap file",
        run / "logs" / f".draft.old-{DEAD}" / "draft.md": b"an old draft\n",
        run / f".final.tmp-{DEAD}" / "mine.txt": b"kept\n",
    }
    for path, content in users.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    assert cli.train_main(RESUME) == 0
    assert {path: path.read_bytes() for path in users} == users
    assert not (run / "logs" / "draft").exists()  # not "put back" either
    assert (run / "checkpoints" / "step_6.pt").is_file()


KILLED = """
import os, sys
from pathlib import Path
import smollm2.files as files

run = Path(sys.argv[1])
if sys.argv[2] != "this":
    files.HOST = "0" * 8  # a process of another host sharing the file system
checkpoint = files.staged_file(run / "checkpoints" / "step_6.pt")  # a checkpoint half written
Path(checkpoint.__enter__()).write_bytes(b"half a checkpoint")
build = files.build_folder(run / "final", "model")  # a build of final/ under way
(build.__enter__() / "config.json").write_text("{")
files.exchange = lambda a, b: False  # no RENAME_EXCHANGE: two renames, and the process dies between them
with files.build_folder(run / "final", "model") as staging:
    (staging / "config.json").write_text("{}")
    renames = []
    real = Path.rename

    def rename(self, target):
        renames.append(self)
        if len(renames) == 2:
            os._exit(9)
        return real(self, target)

    Path.rename = rename
"""


def kill_in_the_middle(run: Path, host: str) -> list[Path]:
    """What a smollm2 process killed outright (SIGKILL) leaves behind: staging of a checkpoint, of
    final/, and a swap of final/ stopped between its two renames (final/ is missing)."""
    result = subprocess.run([sys.executable, "-c", KILLED, str(run), host], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert not (run / "final").exists()
    return sorted(leftovers(run))


def test_leftovers_of_a_killed_process_are_cleaned_and_its_half_swap_put_back(workspace):
    run = workspace / "run"
    final = snapshot(run / "final")
    assert len(kill_in_the_middle(run, "this")) == 4  # step_6.pt's, final/'s two, and the old final/
    assert cli.train_main(RESUME) == 0
    assert not leftovers(workspace)
    assert (run / "checkpoints" / "step_6.pt").is_file() and (run / "final" / "model.safetensors").is_file()
    assert final != snapshot(run / "final")  # put back, then replaced by the resumed run's


def test_a_half_swapped_final_is_put_back_whole(workspace):
    run = workspace / "run"
    final = snapshot(run / "final")
    kill_in_the_middle(run, "this")
    from smollm2.files import clean_leftovers

    clean_leftovers(run, {"final"})
    assert snapshot(run / "final") == final


def test_leftovers_of_a_process_on_another_host_are_left_alone(workspace):
    """A dead pid here says nothing of a process on another machine sharing the file system."""
    run = workspace / "run"
    left = kill_in_the_middle(run, "another")
    from smollm2.files import clean_leftovers

    clean_leftovers(run, {"final"})
    clean_leftovers(run / "checkpoints", {"step_6.pt"})
    assert sorted(leftovers(run)) == left and not (run / "final").exists()
