"""bench/gpu_check.py, run small on the CPU so that it keeps working between GPU loans."""

import subprocess
import sys

from tests.helpers import ROOT


def test_gpu_check_runs_end_to_end_on_cpu():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--presets",
            "config/tiny.yaml",
            "--seq_len",
            "32",
            "--batch_size",
            "2",
            "--steps",
            "1",
            "--no_compile",
            "--seed_steps",
            "3",
            "--seed_config",
            "config/tiny.yaml",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attention (config/tiny.yaml, fp32): aten::_scaled_dot_product_flash_attention_for_cpu" in result.stdout
    assert result.stdout.count("tokens/s, MFU") == 4  # with and without gradient checkpointing; masked and not
    difference = float(result.stdout.split("largest logit difference ")[1].split()[0])
    assert difference < 1e-5  # fp32 on a CPU: packed documents compute as if each were alone
    seed_job = result.stdout.split("the seed's job as its config stands")[1]
    assert "s for the whole command" in seed_job and "5000 steps' training steps alone in about" in seed_job
