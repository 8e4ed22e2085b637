"""A run as a Hugging Face Space: what the app shows, the folder `export-space` writes, the push.

The Space folder:

    app.py             # runs smollm2.app
    smollm2/           # this package, what app.py imports
    requirements.txt   # for a CPU Space (gradio itself comes with the Space's SDK)
    README.md          # the Space's YAML front matter, then the model card
    model/             # weights (safetensors), config, tokenizer
    logs/              # metrics.jsonl, samples.md, loss.png
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from smollm2.checkpoint import list_checkpoints, load_model_from_checkpoint
from smollm2.config import ModelConfig
from smollm2.errors import UserError, error_reason
from smollm2.files import build_folder, check_replaceable, is_inside, write_atomic
from smollm2.hf import llama_incompatibility, load_pretrained, save_pretrained
from smollm2.metrics import Predictions, read_metrics, read_samples

PACKAGE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path("runs/demo/final")
APP_PY = PACKAGE.parent / "app.py"  # the repository's own, copied as it is
# torch from PyTorch's CPU index: the CUDA build from PyPI is gigabytes a CPU Space never uses.
SPACE_REQUIREMENTS = f"""--extra-index-url https://download.pytorch.org/whl/cpu
torch=={torch.__version__.split("+")[0]}
numpy>=1.26
pyyaml>=6.0
safetensors>=0.4
tokenizers>=0.20
matplotlib>=3.8
"""


# ---------------------------------------------------------------------------------------------
# What the app shows


@dataclass
class RunRecord:
    """A trained model's story: its config, its logged metrics and its predictions by step."""

    config: ModelConfig
    parameters: int
    metrics: list[dict]
    predictions: list[Predictions]

    @property
    def last(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    def final_loss(self, key: str) -> float | None:
        return next((row[key] for row in reversed(self.metrics) if key in row), None)

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [*self.config.architecture_rows(), ("parameters", f"{self.parameters:,}")]
        if self.metrics:
            rows.append(("steps", f"{self.last['step']:,}"))
            if "tokens" in self.last:
                rows.append(("tokens seen", f"{self.last['tokens']:,}"))
        for name, key in (("final train loss", "loss"), ("final val loss", "val_loss")):
            value = self.final_loss(key)
            if value is not None:
                rows.append((name, f"{value:.4f}"))
        return rows

    def summary_markdown(self) -> str:
        return "| the run | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in self.summary_rows())


def read_record(config: ModelConfig, parameters: int, logs: Path | None) -> RunRecord:
    if logs is None:
        return RunRecord(config, parameters, [], [])
    return RunRecord(config, parameters, read_metrics(logs / "metrics.jsonl"), read_samples(logs / "samples.md"))


def logs_beside(model: Path) -> Path | None:
    """A run's logs/ for its final/ folder or one of its checkpoints/step_N.pt; None if absent."""
    run = model.parent.parent if model.is_file() else model.parent
    for candidate in (model / "logs", model.parent / "logs", run / "logs"):
        if candidate.is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# export-space


SPACE_FILES = frozenset({"app.py", "smollm2", "requirements.txt", "README.md", "model", "logs"})


def export_space(run: Path, out: Path) -> Path:
    """Write the Space folder for `run` (a run folder) to `out`, built aside and swapped into place.

    `out` must be new, empty, or a Space folder written by export-space: never the run itself, a
    folder that holds the run, or a folder of someone else's.
    """
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    if is_inside(run, out):
        raise UserError(f"--out {out} holds the run {run} itself: choose a new folder, e.g. {run / 'space'}")
    check_replaceable(out, "space", "--out", SPACE_FILES)
    if not APP_PY.is_file():
        raise UserError(f"{APP_PY} not found: export-space works from a clone of the repository")
    model, tokenizer = load_run_model(run)
    logs = run / "logs"
    with build_folder(out, "space") as staging:
        save_pretrained(model, staging / "model", tokenizer)
        if logs.is_dir():
            (staging / "logs").mkdir()
            for name in ("metrics.jsonl", "samples.md", "loss.png"):
                if (logs / name).is_file():
                    shutil.copy2(logs / name, staging / "logs" / name)
        shutil.copytree(PACKAGE, staging / "smollm2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(APP_PY, staging / "app.py")
        write_atomic(staging / "requirements.txt", SPACE_REQUIREMENTS)
        record = read_record(model.config, model.num_parameters(), staging / "logs" if logs.is_dir() else None)
        write_atomic(staging / "README.md", space_readme(record, run))
    return out


def load_run_model(run: Path):
    """The run's final/ model, or its latest checkpoint's when the run never finished."""
    if (run / "final").is_dir():
        return load_pretrained(run / "final")
    checkpoints = list_checkpoints(run / "checkpoints")
    if not checkpoints:
        raise UserError(f"{run}: neither final/ nor checkpoints/step_N.pt found (is it a training run's folder?)")
    return load_model_from_checkpoint(checkpoints[-1])


def space_readme(record: RunRecord, run: Path) -> str:
    import gradio

    title = f"SmolLM2 {record.parameters / 1e6:.0f}M"
    front_matter = (
        "---\n"
        f"title: {title}\n"
        "emoji: 📜\n"
        "colorFrom: indigo\n"
        "colorTo: yellow\n"
        "sdk: gradio\n"
        f"sdk_version: {gradio.__version__}\n"
        "app_file: app.py\n"
        "pinned: false\n"
        f"short_description: A {record.parameters / 1e6:.0f}M-parameter SmolLM2 trained from scratch\n"
        "---\n"
    )
    llama = " with a transformers Llama config.json" if llama_incompatibility(record.config) is None else ""
    sample = ""
    if record.predictions:
        last = record.predictions[-1]
        sample = f"\n## A sample (step {last.step}, {last.losses})\n\n```text\n{last.texts[0]}\n```\n"
    return (
        front_matter
        + f"""
# {title}

A decoder-only transformer of the SmolLM2 family ({record.config.describe()}),
trained from scratch with smollm2 (the run `{run.name}`). The **Generate** tab continues a
prompt, token by token; the **Training** tab shows the loss curves and the predictions the model made
as it learned.

## Model

{record.summary_markdown()}

The weights are in `model/` as safetensors{llama}.
{sample}
## Run it yourself

```bash
pip install -r requirements.txt gradio
python app.py            # then open http://127.0.0.1:7860
```
"""
    )


# ---------------------------------------------------------------------------------------------
# Push


def push_space(folder: Path, repo_id: str) -> str:
    """Upload `folder` as the Space `repo_id`; one clear UserError when it can't (no token, no network)."""
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()
    if not token:
        raise UserError(
            f"no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again ({folder} is ready)"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="space", commit_message="smollm2 Space")
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as exc:
        raise UserError(f"could not push {folder} to the Space {repo_id}: {error_reason(exc)}") from None
    return f"https://huggingface.co/spaces/{repo_id}"
