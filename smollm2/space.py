"""A run as a Hugging Face Space: what the app shows, the folder `export-space` writes, the push.

The Space folder:

    app.py             # runs smollm2.app
    smollm2/           # this package's modules (*.py, nothing else of its folder), what app.py imports
    requirements.txt   # for a CPU Space (gradio itself comes with the Space's SDK)
    README.md          # the Space's YAML front matter, then the model card
    run.json           # the run's name, corpus and prompts (the app starts with the first prompt)
    model/             # weights (safetensors), config, tokenizer
    logs/              # metrics.jsonl, samples.md, loss.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from smollm2.checkpoint import peek_checkpoint
from smollm2.config import ModelConfig
from smollm2.errors import UserError, error_reason, read_json_file
from smollm2.files import (
    build_folder,
    check_regular,
    check_replaceable,
    copy_regular_file,
    inside_another,
    is_inside,
    write_atomic,
)
from smollm2.hf import llama_incompatibility, save_pretrained
from smollm2.metrics import Predictions, numeric_rows, read_metrics, read_samples
from smollm2.model_source import ModelSource
from smollm2.run_folder import RunFolder

PACKAGE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path("runs/demo/final")
RUN_FILE = "run.json"
NEUTRAL_PROMPT = "Once upon a time"  # the app's first prompt when the run's prompts are unknown
LICENSE = "apache-2.0"  # the project's (pyproject.toml)
TAGS = ["smollm2", "text-generation", "pytorch", "causal-lm"]
# Corpora the card can name, recognised by their bytes (size, sha256); any other goes by its path.
KNOWN_CORPORA = {(1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"): "tiny Shakespeare"}
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


def short_count(n: int) -> str:
    """3.7M, 135M, 1.7B: one decimal below 10 of a unit, none above (3.67M is not "4M")."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 9.95 else f"{value:.0f}{unit}"
    return str(n)


def read_record(config: ModelConfig, parameters: int, logs: Path | None) -> RunRecord:
    if logs is None:
        return RunRecord(config, parameters, [], [])
    metrics = numeric_rows(read_metrics(logs / "metrics.jsonl"))
    return RunRecord(config, parameters, metrics, read_samples(logs / "samples.md"))


def logs_beside(model: Path) -> Path | None:
    """The logs/ of the run a model belongs to (a run folder, its final/ or one of its checkpoints),
    or beside an exported Space's model/; None if absent."""
    run = RunFolder.containing(model)
    for candidate in (run.logs if run else None, model.parent / "logs"):
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# The run behind a model: its name, its corpus, its prompts


@dataclass
class RunFacts:
    """What a Space says of its run beyond the model; unknown facts stay None or empty, never guessed."""

    name: str
    data_path: str | None = None  # the config's data.path
    corpus: str | None = None  # its name, when its bytes are a known corpus's: "tiny Shakespeare"
    prompts: list[str] = field(default_factory=list)

    @property
    def first_prompt(self) -> str:
        return self.prompts[0] if self.prompts else NEUTRAL_PROMPT

    def training_data(self) -> str | None:
        """Markdown: "tiny Shakespeare (`input.txt`)", or "`input.txt`" alone; None when unknown."""
        if self.data_path is None:
            return None
        return f"{self.corpus} (`{self.data_path}`)" if self.corpus else f"`{self.data_path}`"


def run_facts(run: Path) -> RunFacts:
    config = last_config(run)
    sources = (config.get("data") or {}).get("sources")
    if isinstance(sources, list):  # a mixture (data.sources): its paths and weights, as the config says
        named = [f"{published_name(s.get('path'))} x {s.get('weight')}" for s in sources if isinstance(s, dict)]
        return RunFacts(Path(run).resolve().name, ", ".join(named), prompts=config_prompts(config))
    data_path = (config.get("data") or {}).get("path")
    if not isinstance(data_path, str):
        return RunFacts(Path(run).resolve().name, prompts=config_prompts(config))
    corpus = known_corpus(prepared_sources(run, config))
    return RunFacts(Path(run).resolve().name, published_name(data_path), corpus, config_prompts(config))


def published_name(path: object) -> str:
    """A corpus path as a Space may publish it: its last part (`input.txt`), never the folders above it,
    which name the user's machine (/home/alice/private/...)."""
    return Path(str(path)).name or str(path)


def last_config(run: Path) -> dict:
    """The config of the run's latest checkpoint; {} when there is none to read."""
    latest = RunFolder(run).latest_checkpoint()
    return checkpoint_config(latest) if latest else {}


def checkpoint_config(path: Path) -> dict:
    """A checkpoint's config; {} for a damaged one: the facts it holds are unknown, and nothing else breaks."""
    config = peek_checkpoint(path, "config")
    return config if isinstance(config, dict) else {}


def config_prompts(config: dict) -> list[str]:
    prompts = (config.get("train") or {}).get("prompts")
    return [p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else []


def prepared_sources(run: Path, config: dict) -> list:
    """[path, size, mtime_ns] of each file the run's prepared data was made from ([] if not found)."""
    from smollm2.config import config_from_dict
    from smollm2.data import prepared_folder, read_meta

    try:
        meta = read_meta(prepared_folder(config_from_dict(config, "the run's checkpoint"), run))
    except UserError:
        return []
    fingerprint = (meta or {}).get("fingerprint")
    sources = fingerprint.get("sources") if isinstance(fingerprint, dict) else None
    return sources if isinstance(sources, list) else []


def known_corpus(sources: list) -> str | None:
    """The name of the one corpus file, if it is still what the run read and its bytes are known."""
    if len(sources) != 1 or not isinstance(sources[0], list) or len(sources[0]) != 3:
        return None
    path, size, mtime_ns = sources[0]
    if size not in {known_size for known_size, _ in KNOWN_CORPORA}:
        return None
    try:
        stat = Path(path).stat()
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
            return None  # changed since the run read it
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
    return KNOWN_CORPORA.get((size, digest))


def read_run_file(path: Path) -> RunFacts | None:
    """A Space's run.json; None when it is absent or unreadable (not JSON, nested too deeply): no facts."""
    try:
        raw = read_json_file(path, "a Space's run.json")
    except (OSError, UserError):
        return None
    if not isinstance(raw.get("name"), str):
        return None
    data_path, corpus = (raw.get(key) if isinstance(raw.get(key), str) else None for key in ("data_path", "corpus"))
    return RunFacts(raw["name"], data_path, corpus, config_prompts({"train": raw}))


def opening_prompt(model: Path) -> str:
    """The first prompt of the run a model comes from (a Space's run.json, a checkpoint's config,
    the latest checkpoint beside a run's final/), or a neutral one when that is unknown."""
    model = Path(model)
    if model.is_file():
        prompts = config_prompts(checkpoint_config(model))
    else:
        facts = read_run_file(model.parent / RUN_FILE)
        prompts = facts.prompts if facts else config_prompts(last_config(model.parent))
    return prompts[0] if prompts else NEUTRAL_PROMPT


# ---------------------------------------------------------------------------------------------
# export-space


SPACE_FILES = frozenset({"app.py", "smollm2", "requirements.txt", "README.md", RUN_FILE, "model", "logs"})


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
    where = inside_another(out)
    if where:
        raise UserError(f"--out {out} {where}: choose another folder")
    if not APP_PY.is_file():
        raise UserError(f"{APP_PY} not found: export-space works from a clone of the repository")
    model, tokenizer = load_run_model(run)
    facts = run_facts(run)
    logs = RunFolder(run).logs
    # Everything the Space holds is published by --push: copies of regular files only, through no link.
    with build_folder(out, "space") as staging:
        save_pretrained(model, staging / "model", tokenizer)
        if logs.is_dir() or logs.is_symlink():
            (staging / "logs").mkdir()
            for path in (RunFolder(run).metrics, RunFolder(run).samples, RunFolder(run).plot):
                if path.exists() or path.is_symlink():
                    copy_regular_file(path, staging / "logs" / path.name, run)
        copy_package(staging / "smollm2")
        copy_regular_file(APP_PY, staging / "app.py")
        write_atomic(staging / "requirements.txt", SPACE_REQUIREMENTS)
        write_atomic(staging / RUN_FILE, json.dumps(dataclasses.asdict(facts), indent=2) + "\n")
        record = read_record(model.config, model.num_parameters(), staging / "logs" if logs.is_dir() else None)
        write_atomic(staging / "README.md", space_readme(record, facts))
    return out


def copy_package(destination: Path) -> None:
    """The package's own modules, the only files the Space's app imports from it (it reads no data file):
    nothing else that lies in its folder (a `.env` holding a token, notes, a scratch folder) is published."""
    destination.mkdir()
    for path in package_modules():
        copy_regular_file(path, destination / path.name, PACKAGE)


def package_modules() -> list[Path]:
    """The package folder's `*.py` files by name, hidden ones left out (a link is refused as it is copied)."""
    return sorted(path for path in PACKAGE.iterdir() if path.suffix == ".py" and not path.name.startswith("."))


def load_run_model(run: Path):
    """The run's final/ model, or its latest checkpoint's when the run never finished; what it is
    read from (and the latest checkpoint, whose config the card tells of) may not link out of the run."""
    if not RunFolder(run).looks_like_a_run():
        raise UserError(f"{run}: neither final/ nor checkpoints/step_N.pt found (is it a training run's folder?)")
    source = ModelSource.open(run, "--run")
    for path in (source.path, RunFolder(run).latest_checkpoint()):
        if path is not None:
            check_regular(path, run)
    return source.load()


def front_matter(record: RunRecord) -> str:
    """The Space's settings and the card's metadata: no base_model (trained from scratch), and
    datasets only by a Hub id (a corpus read from local files has none)."""
    import gradio

    count = short_count(record.parameters)
    meta = {
        "title": f"SmolLM2 {count}",
        "emoji": "📜",
        "colorFrom": "indigo",
        "colorTo": "yellow",
        "sdk": "gradio",
        "sdk_version": gradio.__version__,
        "app_file": "app.py",
        "pinned": False,
        "short_description": f"A {count}-parameter SmolLM2 trained from scratch",
        "license": LICENSE,
        "tags": TAGS,
        "pipeline_tag": "text-generation",
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def usage(record: RunRecord, facts: RunFacts) -> str:
    """How to run the model outside the Space: transformers when it is llama-shaped, else smollm2."""
    local = gguf_name(facts.name)  # the GGUF's name, and the model's in ollama
    if llama_incompatibility(record.config) is None:
        return f"""## Use it with transformers

`model/` is a transformers Llama folder; from this Space's folder:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("model")
model = AutoModelForCausalLM.from_pretrained("model")
inputs = tokenizer({facts.first_prompt!r}, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=100, do_sample=True, temperature=0.8, top_k=50)
print(tokenizer.decode(output[0]))
```

## Run it with llama.cpp, ollama or LM Studio

smollm2 writes it as one GGUF file beside this folder (`--outtype bf16` or `q8_0` for a smaller one):

```bash
pip install -r requirements.txt gguf
python -m smollm2 export --model model --format gguf --out ../{local}.gguf
cd ..
llama-cli -m {local}.gguf                                                        # llama.cpp
echo "FROM ./{local}.gguf" > Modelfile && ollama create {local} -f Modelfile && ollama run {local}
```

LM Studio: `lms import {local}.gguf`, or put the file under its models folder.
"""
    return f"""## Use it with smollm2

Its architecture ({llama_incompatibility(record.config)}) has no transformers equivalent; the
smollm2 package in this folder runs it:

```bash
pip install -r requirements.txt
python -m smollm2 generate --model model --prompt {shlex.quote(facts.first_prompt)} --max_new_tokens 100
```
"""


def gguf_name(run_name: str) -> str:
    """The run's name as a file and ollama model name: lower case, no character a shell or ollama minds."""
    return re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-.") or "smollm2"


def space_readme(record: RunRecord, facts: RunFacts) -> str:
    title = f"SmolLM2 {short_count(record.parameters)}"
    data = facts.training_data()
    data = f" on {data}" if data else "; its training data is not recorded with the run"
    llama = " with a transformers Llama config.json" if llama_incompatibility(record.config) is None else ""
    sample = ""
    if record.predictions:
        last = record.predictions[-1]
        sample = f"\n## A sample (step {last.step}, {last.losses})\n\n```text\n{last.texts[0]}\n```\n"
    return (
        front_matter(record)
        + f"""
# {title}

A decoder-only transformer of the SmolLM2 family ({record.config.describe()}),
trained from scratch with smollm2 (the run `{facts.name}`){data}. The **Generate** tab continues a
prompt, token by token; the **Training** tab shows the loss curves and the predictions the model made
as it learned.

## Model

{record.summary_markdown()}

The weights are in `model/` as safetensors{llama}.
{sample}
{usage(record, facts)}
## Run it yourself

```bash
pip install -r requirements.txt gradio
python app.py            # then open http://127.0.0.1:7860
```
"""
    )


# ---------------------------------------------------------------------------------------------
# Push


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"--push {repo_id!r} is not a Space id: expected user/name") from None
    if "/" not in repo_id:
        raise UserError(f"--push {repo_id!r} is not a Space id: expected user/name")


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
