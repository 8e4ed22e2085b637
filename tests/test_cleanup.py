"""A command that fails leaves behind none of the folders it created on the way, and nothing else."""

import pytest
import yaml

from smollm2 import cli
from tests.helpers import tiny_config


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_a_failed_command_removes_the_nested_folders_it_created(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input.txt").write_text("too short to train on\n")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config()))
    (tmp_path / "shared").mkdir()  # the user's folder: it stays, even though it is empty
    args = ["--config", "tiny.yaml", "--set", "data.prepared_dir=shared/a/b/c", "--out_dir", "runs/one"]
    if command == "prepare":
        assert cli.main(["prepare", *args]) == 2
    else:
        assert cli.train_main([*args, "--train_steps", "2"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["input.txt", "shared", "tiny.yaml"]
