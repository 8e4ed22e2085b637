"""Data-parallel training on CPU: two gloo processes under torchrun against one process."""

import pytest
import torch

from tests.helpers import losses
from tests.helpers import run_distributed as run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(ddp_folder, parallel):
    run(ddp_folder, "--train_steps", "6", "--out_dir", "ddp", "--set", f"train.parallel={parallel}", processes=2)
    # One process with twice the micro-batch sees the same windows: rank r takes slice r of each.
    run(ddp_folder, "--train_steps", "6", "--out_dir", "single", "--set", "train.batch_size=4")
    ddp, single = losses(ddp_folder / "ddp"), losses(ddp_folder / "single")
    assert len(ddp) == len(single) == 6
    for a, b in zip(ddp, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    a = torch.load(ddp_folder / "ddp/checkpoints/step_6.pt", weights_only=True)["model"]
    b = torch.load(ddp_folder / "single/checkpoints/step_6.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_in_one_process(ddp_folder, parallel):
    run(ddp_folder, "--train_steps", "4", "--out_dir", "ddp", "--set", f"train.parallel={parallel}", processes=2)
    run(
        ddp_folder,
        "--train_steps",
        "2",
        "--out_dir",
        "ddp",
        "--set",
        "train.batch_size=4",
        "--checkpoint_path",
        "ddp/checkpoints/step_4.pt",
    )
    run(
        ddp_folder, "--train_steps", "6", "--out_dir", "single", "--set", "train.batch_size=4", "train.schedule_steps=4"
    )
    resumed, single = losses(ddp_folder / "ddp"), losses(ddp_folder / "single")
    assert len(resumed) == 6
    for a, b in zip(resumed, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
