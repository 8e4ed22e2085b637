"""Data-parallel training on CPU: two gloo processes under torchrun against one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_trainer import CORPUS, ROOT, tiny_config


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "input.txt").write_text(CORPUS)
    config = tiny_config(batch_size=2, grad_accum=2, eval_every=100, predict_every=100, save_every=100)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def run(folder: Path, *args: str, processes: int = 1) -> None:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29531"]
        if processes > 1
        else [sys.executable]
    )
    result = subprocess.run(
        [*launcher, str(ROOT / "train.py"), "--config", "ddp.yaml", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", **_env()},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(folder, parallel):
    run(folder, "--train_steps", "6", "--out_dir", "ddp", "--set", f"train.parallel={parallel}", processes=2)
    # One process with twice the micro-batch sees the same windows: rank r takes slice r of each.
    run(folder, "--train_steps", "6", "--out_dir", "single", "--set", "train.batch_size=4")
    ddp, single = losses(folder / "ddp"), losses(folder / "single")
    assert len(ddp) == len(single) == 6
    for a, b in zip(ddp, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    a = torch.load(folder / "ddp/checkpoints/step_6.pt", weights_only=True)["model"]
    b = torch.load(folder / "single/checkpoints/step_6.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_in_one_process(folder, parallel):
    run(folder, "--train_steps", "4", "--out_dir", "ddp", "--set", f"train.parallel={parallel}", processes=2)
    run(
        folder,
        "--train_steps",
        "2",
        "--out_dir",
        "ddp",
        "--set",
        "train.batch_size=4",
        "--checkpoint_path",
        "ddp/checkpoints/step_4.pt",
    )
    run(folder, "--train_steps", "6", "--out_dir", "single", "--set", "train.batch_size=4", "train.schedule_steps=4")
    resumed, single = losses(folder / "ddp"), losses(folder / "single")
    assert len(resumed) == 6
    for a, b in zip(resumed, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
