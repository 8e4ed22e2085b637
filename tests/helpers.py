"""What many test files share: the repository, a tiny run's config, reading a run's files, and the
checks of a refused mistake (exit 2, one line, every file that existed before byte-identical).
Fixtures live in conftest.py; no test module imports another."""

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (ROOT / "input.txt").read_text()[:60_000]
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_instruct import cache_folder  # noqa: E402

INSTRUCT = cache_folder()  # the published SmolLM2-135M-Instruct ($SMOLLM2_CACHE), as every real-weights test


def needs_instruct():
    import pytest

    return pytest.mark.skipif(
        not (INSTRUCT / "model.safetensors").is_file(),
        reason=f"the published SmolLM2-135M-Instruct is not cached in {INSTRUCT}: python scripts/fetch_instruct.py",
    )


def tiny_config(norm="rmsnorm", mlp="swiglu", **train_changes) -> dict:
    return {
        "model": {
            "n_layers": 2,
            "hidden_size": 32,
            "n_heads": 4,
            "n_kv_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 320,
            "norm": norm,
            "mlp": mlp,
            "max_seq_len": 64,
            "tie_embeddings": True,
        },
        "data": {"path": "input.txt", "seq_len": 32, "val_fraction": 0.1},
        "train": {
            "batch_size": 4,
            "grad_accum": 2,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 3,
            "eval_every": 5,
            "eval_batches": 2,
            "predict_every": 5,
            "predict_tokens": 8,
            "save_every": 5,
            "keep_last": 10,
            "prompts": ["ROMEO:"],
            "wandb": False,
            "precision": "fp32",
        }
        | train_changes,
    }


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in metrics(run)]


def run_train(*args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def run_distributed(folder: Path, *args: str, processes: int = 1) -> None:
    """train.py with `ddp.yaml` in `folder`, under torch.distributed.run when `processes` > 1."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29531"]
        if processes > 1
        else [sys.executable]
    )
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(
        [*launcher, str(ROOT / "train.py"), "--config", "ddp.yaml", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", **environment},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def refused(capsys, folder: Path, command, argv: list[str], message: str) -> str:
    """Run a CLI command in-process: exit 2, one line naming `message`, every old file untouched."""
    before = snapshot(folder)
    code = command(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    after = snapshot(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, changed
    assert not leftovers(folder)
    return err


def train_refused(capsys, folder, argv, message) -> str:
    from smollm2 import cli

    return refused(capsys, folder, cli.train_main, argv, message)


def main_refused(capsys, folder, argv, message) -> str:
    from smollm2 import cli

    return refused(capsys, folder, cli.main, argv, message)


def json_task(folder: Path, name: str = "evil.yaml", data: Path | None = None, **fields) -> Path:
    """An lm-eval task over a local JSONL file (three questions) through datasets' json builder, no
    !function anywhere: a generate_until task unless `fields` say otherwise (a None field is left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = folder / "questions.jsonl"
        data.write_text(
            "".join(json.dumps({"q": f"What is {n}?", "a": str(n), "choices": ["1", "2"]}) + "\n" for n in (1, 2, 3))
        )
    settings = {
        "task": Path(name).stem,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{q}}",
        "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 2},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    } | fields
    settings = {key: value for key, value in settings.items() if value is not None}
    path = folder / name
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@contextlib.contextmanager
def served_app(app_args: list[str], cwd: Path) -> Iterator[str]:
    """`python APP_ARGS --port P --precision fp32` (an app.py) run in `cwd` until the block ends; its URL
    once it listens on 127.0.0.1. smollm2's own settings (SMOLLM2_*) stay out of its environment."""
    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLLM2_")} | {"GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, *app_args, "--port", str(port), "--precision", "fp32"]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"app.py exited: {process.stdout.read()}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app.py did not start listening within 120 s")
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=30)
