"""Evaluation: our lm-eval backend against lm-eval's own `hf` backend on the same weights (local
tasks in tests/eval_tasks, no network), held-out text in bits per byte, the `eval` command and
its refusals, and benchmark figures during training."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from smollm2 import cli, evaluation
from smollm2.app import benchmark_frame
from smollm2.config import config_from_dict
from smollm2.hf import load_pretrained, write_model_folder
from smollm2.model import SmolLM2
from smollm2.model_source import ModelSource
from smollm2.tokenizer import train_tokenizer
from smollm2.trainer import train
from tests.conftest import small_config
from tests.helpers import CORPUS, refused, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "eval_tasks"
LOCAL_TASKS = [str(TASKS / name) for name in ("multiple_choice.yaml", "generation.yaml", "texts.yaml")]

evaluation.stay_offline()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny random Llama with a BPE tokenizer trained on the corpus, as a transformers folder.
    Its weights are drawn wide (std 0.3), so its choices are decided, not near-ties."""
    lines = [line for line in (ROOT / "input.txt").read_text().splitlines() if line][:3000]
    tokenizer = train_tokenizer(lines, 400)
    torch.manual_seed(0)
    model = SmolLM2(small_config(vocab_size=400, max_seq_len=64, init_std=0.3))
    folder = tmp_path_factory.mktemp("eval") / "model"
    write_model_folder(model, folder, tokenizer)
    return folder


def responses(results: dict) -> dict[str, list]:
    """Each task's per-sample responses, in document order."""
    return {
        task: [sample["resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }


def assert_same_evaluation(ours: dict, theirs: dict) -> None:
    """The same log-likelihood (within 1e-4) and greedy flag for every choice, the same generated
    text, and the same figure for every metric."""
    ours_responses, their_responses = responses(ours), responses(theirs)
    assert ours_responses.keys() == their_responses.keys()
    for task, samples in ours_responses.items():
        assert len(samples) == len(their_responses[task]) > 0
        for mine, reference in zip(samples, their_responses[task], strict=True):
            for (a,), (b,) in zip(mine, reference, strict=True):
                if isinstance(a, str):  # generate_until
                    assert a == b
                elif isinstance(a, float):  # loglikelihood_rolling
                    assert a == pytest.approx(b, abs=1e-4)
                else:  # loglikelihood: (log-probability, greedy?)
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1], task
    rows = {(task, metric): value for task, metric, value, _ in evaluation.metric_rows(ours)}
    reference_rows = {(task, metric): value for task, metric, value, _ in evaluation.metric_rows(theirs)}
    assert rows.keys() == reference_rows.keys()
    for key, value in rows.items():
        assert value == pytest.approx(reference_rows[key], rel=1e-5), key


def evaluate_both(folder: Path, tasks: list[str], limit: int | None, **hf_args) -> tuple[dict, dict]:
    from lm_eval import simple_evaluate

    chosen = evaluation.load_tasks(tasks, allow_code=True)  # the local tasks read their data with local_data.py
    ours = evaluation.SmolLM2Harness.create_from_arg_obj({"model": str(folder), "precision": "fp32"}, {"batch_size": 4})
    our_results = evaluation.run_tasks(ours, chosen, limit, log_samples=True)
    their_results = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32"} | hf_args,
        tasks=chosen.specs,
        task_manager=chosen.manager,
        limit=limit,
        batch_size=4,
        device="cpu",
        log_samples=True,
        bootstrap_iters=1000,
        verbosity="ERROR",
    )
    return our_results, their_results


def test_our_backend_scores_as_lm_evals_hf_backend(model_folder):
    ours, theirs = evaluate_both(model_folder, LOCAL_TASKS, limit=None)
    assert_same_evaluation(ours, theirs)
    assert ours["results"]["local_multiple_choice"]["sample_len"] == 20
    generated = [text for ((text,),) in (r for r in responses(ours)["local_generation"])]
    assert any(generated), "the generation task produced only empty strings: it compares nothing"


def test_bits_per_byte_of_a_text_equal_a_direct_computation(model_folder):
    model, tokenizer = load_pretrained(model_folder)
    text = "Bytes, not characters: naïve café, 東京."
    tokens = tokenizer.encode(text)
    assert len(tokens) < model.config.max_seq_len  # one window: every token after all before it
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.eos_id] + tokens[:-1]]))
    nll = F.cross_entropy(logits[0], torch.tensor(tokens), reduction="sum").item()
    metrics = evaluation.text_metrics(model, tokenizer, text, stride=8)
    assert metrics["tokens"] == len(tokens) and metrics["bytes"] == len(text.encode()) > len(text)
    assert metrics["bits_per_byte"] == pytest.approx(nll / (len(text.encode()) * math.log(2)), rel=1e-5)
    assert metrics["loss_per_token"] == pytest.approx(nll / len(tokens), rel=1e-5)


@pytest.mark.parametrize("stride", [1, 5, 32, 64])
def test_rolling_windows_score_every_token_once_within_the_context(stride):
    tokens = list(range(1, 150))
    windows = evaluation.rolling_windows(tokens, 0, 64, stride)
    scored = [token for sequence, count in windows for token in sequence[-count:]]
    assert scored == tokens
    assert all(len(sequence) - 1 <= 64 for sequence, _ in windows)
    # After the first window every input is a full context: stride new tokens after 64 - stride old.
    assert all(len(sequence) - 1 == 64 and count <= stride for sequence, count in windows[1:])


def test_text_metrics_with_the_whole_context_as_stride_equal_lm_evals_rolling_perplexity(model_folder):
    """lm-eval scores perplexity tasks in disjoint windows: our stride = context is the same measure."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    model, tokenizer = load_pretrained(model_folder)
    texts = [json.loads(line)["text"] for line in (TASKS / "texts.jsonl").read_text().splitlines()]
    long_text = "\n".join(texts * 3)  # several windows
    ours = evaluation.text_metrics(model, tokenizer, long_text, stride=model.config.max_seq_len)
    hf = get_model("hf")(pretrained=str(model_folder), dtype="float32", device="cpu", batch_size=4)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(long_text,), idx=0)
    (logprob,) = hf.loglikelihood_rolling([request], disable_tqdm=True)
    assert ours["tokens"] > 2 * model.config.max_seq_len
    assert ours["bits_per_byte"] == pytest.approx(-logprob / (len(long_text.encode()) * math.log(2)), rel=1e-5)


def test_eval_command_prints_the_table_and_writes_json(model_folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    text = tmp_path / "held_out.txt"
    text.write_text((ROOT / "input.txt").read_text()[:3000])
    tasks = f"{TASKS / 'multiple_choice.yaml'},{TASKS / 'generation.yaml'}"
    argv = ["eval", "--model", str(model_folder), "--tasks", tasks, "--limit", "3", "--text", str(text), "--allow_code"]
    assert cli.main([*argv, "--stride", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "local_multiple_choice" in printed and "acc_norm" in printed and "bits/byte" in printed
    report = json.loads(out.read_text())
    assert report["results"]["local_multiple_choice"]["sample_len"] == 3
    assert report["text"]["stride"] == 16 and report["text"]["window"] == 64
    assert report["text"]["bytes"] == len(text.read_bytes())
    assert cli.main([*argv, "--stride", "8", "--out", str(out)]) == 0  # its own report: replaced
    assert json.loads(out.read_text())["text"]["stride"] == 8


@pytest.fixture
def workspace(model_folder, tmp_path, monkeypatch) -> Path:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "notes.txt").write_text("a week of notes\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    (tmp_path / "includes_list.yaml").write_text("include: list.yaml\ntask: x\n")
    (tmp_path / "includes_nothing.yaml").write_text("include: missing.yaml\ntask: y\n")
    (tmp_path / "no_module.yaml").write_text("task: z\ncustom_dataset: !function nowhere.data\n")
    (tmp_path / "mine.json").write_text('{"model": "gpt-2", "notes": "my own table of models"}\n')
    (tmp_path / "looks_ours.json").write_text('{"format": "smollm2-eval/1", "model": "gpt-2", "text": "mine"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
        (["--tasks", "arc_easy", "--limit", "2"], "not in the local Hugging Face cache"),
        (["--tasks", "missing.yaml"], "task file missing.yaml: no such file"),
        (["--text", "empty.txt"], "the file is empty"),
        (["--text", "latin1.txt"], "not UTF-8 text"),
        (["--text", "absent.txt"], "no such file"),
        (["--text", "notes.txt", "--stride", "65"], "--stride must be between 1 and the window"),
        (["--text", "notes.txt", "--limit", "0"], "--limit must be at least 1"),
        (["--text", "notes.txt", "--out", "results"], "is a folder"),
        (["--text", "notes.txt", "--out", "notes.txt"], "exists and is not results smollm2 wrote"),
        (["--text", "notes.txt", "--out", "mine.json"], "exists and is not results smollm2 wrote"),
        (["--text", "notes.txt", "--out", "looks_ours.json"], "exists and is not results smollm2 wrote"),
        (["--text", "notes.txt", "--out", "notes.txt/eval.json"], "--out notes.txt/eval.json: notes.txt is a file"),
        (["--text", "results"], "--text results: a folder"),
        (["--tasks", str(TASKS / "multiple_choice.yaml"), "--num_fewshot", "-1"], "--num_fewshot must be 0 or more"),
        ([], "nothing to evaluate"),
        (["--split", "val"], "is not in a run folder (RUN, RUN/final or RUN/checkpoints/step_N.pt)"),
        (["--tasks", "list.yaml"], "task file {}/list.yaml: expected a YAML mapping of task settings, got list"),
        (
            ["--tasks", "broken.yaml", "--allow_code"],
            "task file {}/broken.yaml: not valid YAML (line 2: expected ',' or ']'",
        ),
        (["--tasks", "includes_list.yaml"], "task file {}/list.yaml: expected a YAML mapping"),
        (["--tasks", "includes_nothing.yaml"], "task file {}/missing.yaml: no such file"),
        (["--tasks", "no_module.yaml", "--allow_code"], "task file no_module.yaml: Cannot import module 'nowhere'"),
        (["--text", "notes.txt", "--stride", "0"], "--stride must be between 1 and the window (64 tokens), got 0"),
        (["--text", "notes.txt", "--window", "0"], "--window must be between 2 and the model's context (64), got 0"),
    ],
)
def test_eval_refuses_bad_input_in_one_line(workspace, model_folder, capsys, flags, message):
    message = message.format(workspace.resolve())
    refused(capsys, workspace, cli.main, ["eval", "--model", str(model_folder), *flags], message)


def test_eval_refuses_a_checkpoint_that_is_not_one(workspace, capsys):
    argv = ["eval", "--checkpoint", "notes.txt", "--tasks", str(TASKS / "multiple_choice.yaml"), "--allow_code"]
    refused(capsys, workspace, cli.main, argv, "notes.txt")


@pytest.fixture
def run_folder(tmp_path, monkeypatch) -> Path:
    (tmp_path / "input.txt").write_text(CORPUS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_eval_split_val_scores_the_runs_own_held_out_tokens(run_folder, capsys):
    """--split val: every token of the run's val.bin scored once (end-of-text tokens too), over the
    bytes its text has; the train and val splits' texts add up to the corpus, byte for byte."""
    train(config_from_dict(tiny_config(), "tiny"), 2, None, "run")
    data = run_folder / "run" / "data" / "input-320"
    dtype = json.loads((data / "meta.json").read_text())["dtype"]
    val, train_ids = (np.fromfile(data / f"{split}.bin", dtype=dtype).tolist() for split in ("val", "train"))
    model, tokenizer = ModelSource.open(run_folder / "run").load()
    n_bytes = {
        name: len(tokenizer.decode([t for t in ids if t != tokenizer.eos_id]).encode())
        for name, ids in (("val", val), ("train", train_ids))
    }
    assert n_bytes["val"] + n_bytes["train"] == len(CORPUS.encode())
    inputs = [tokenizer.eos_id, *val[:-1]]
    trained = 32  # tiny_config's data.seq_len (its context is 64): the default window of --split val
    with torch.no_grad():  # disjoint windows of the trained length, computed here
        nll = sum(
            F.cross_entropy(
                model(torch.tensor([inputs[i : i + trained]]))[0],
                torch.tensor(val[i : i + trained]),
                reduction="sum",
            )
            for i in range(0, len(val), trained)
        ).item()
    out = run_folder / "split.json"
    argv = ["eval", "--model", "run", "--split", "val", "--stride", "32", "--precision", "fp32", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "windows of 32 tokens" in capsys.readouterr().out
    report = json.loads(out.read_text())["split"]
    assert report["file"] == str(Path("run/data/input-320/val.bin"))
    assert report["window"] == trained and report["stride"] == trained
    assert report["tokens"] == len(val) > 2 * 64 and report["bytes"] == n_bytes["val"]
    assert report["bits_per_byte"] == pytest.approx(nll / (n_bytes["val"] * math.log(2)), rel=1e-4)  # batched
    shutil.copytree(data, data.parent / "other-320")  # two prepared corpora: which one is held out is not said
    refused(capsys, run_folder, cli.main, argv[:-2], "run/data holds 2 prepared corpora (a mixture?); give --text")


def test_eval_tasks_during_training_go_to_the_logs(run_folder):
    from PIL import Image

    task = str(TASKS / "multiple_choice.yaml")
    config = config_from_dict(tiny_config(eval_every=2, eval_tasks=[task], eval_limit=4, eval_allow_code=True), "tiny")
    train(config, 4, None, "run")
    rows = [json.loads(line) for line in (run_folder / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    evaluated = {row["step"]: row for row in rows if "val_loss" in row}
    assert sorted(evaluated) == [2, 4]
    for row in evaluated.values():
        assert {"eval/local_multiple_choice/acc", "eval/local_multiple_choice/acc_norm"} <= row.keys()
        assert row["eval/local_multiple_choice/acc"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 questions
    assert not any(key.startswith("eval/") for row in rows if "val_loss" not in row for key in row)
    assert Image.open(run_folder / "run" / "logs" / "loss.png").size == (800, 800)  # the second panel
    assert benchmark_frame(rows).shape == (4, 3)  # the Space's training tab: 2 metrics x 2 steps


def test_an_unknown_eval_task_is_refused_before_training_writes_anything(run_folder, capsys):
    (run_folder / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(eval_tasks=["no_such_task.yaml"])))
    argv = ["--config", "tiny.yaml", "--train_steps", "2", "--out_dir", "run"]
    refused(capsys, run_folder, cli.train_main, argv, "task file no_such_task.yaml: no such file")
    assert not (run_folder / "run").exists()


def test_the_published_model_scores_the_same_through_both_backends():
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_instruct import cache_folder

    folder = cache_folder()
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"the published SmolLM2-135M-Instruct is not cached in {folder}: python scripts/fetch_instruct.py")
    tasks = [str(TASKS / "multiple_choice.yaml"), str(TASKS / "generation.yaml")]
    ours, theirs = evaluate_both(folder, tasks, limit=2)  # a 135M model on CPU: a few examples
    assert_same_evaluation(ours, theirs)
    assert responses(ours)["local_generation"][0] == [[" Paris"]]  # the real model, really loaded


def test_lm_evals_own_command_line_runs_our_model(model_folder, monkeypatch, capsys):
    """smollm2-lm-eval: lm-eval's CLI, which finds `--model smollm2` in its registry."""
    task = str(TASKS / "multiple_choice.yaml")
    argv = ["smollm2-lm-eval", "run", "--model", "smollm2", "--model_args", f"model={model_folder}"]
    monkeypatch.setattr(sys, "argv", [*argv, "--tasks", task, "--limit", "2", "--batch_size", "2"])
    # lm-eval's index of its own tasks takes seconds to build: the one this session built already.
    monkeypatch.setattr("lm_eval.tasks.TaskManager", lambda include_path=None, **_: evaluation.task_manager(None, True))
    assert evaluation.lm_eval_main() == 0
    table = capsys.readouterr().out
    assert "local_multiple_choice" in table and "acc_norm" in table


@pytest.fixture
def code_task(tmp_path) -> Path:
    """A task file whose data comes from the Python beside it, which leaves a mark when it runs."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "local_data.py").write_text(
        (TASKS / "local_data.py").read_text().replace("HERE = ", f"Path({str(tmp_path / 'ran')!r}).touch()\nHERE = ")
    )
    for name in ("multiple_choice.yaml", "multiple_choice.jsonl"):
        (folder / name).write_bytes((TASKS / name).read_bytes())
    (folder / "inherits.yaml").write_text("include: multiple_choice.yaml\ntask: inherited\n")
    return folder


@pytest.mark.parametrize(
    "flags",
    [["--tasks", "tasks/multiple_choice.yaml"], ["--tasks", "tasks/inherits.yaml"],
     ["--tasks", "local_multiple_choice", "--include_path", "tasks"]],
)  # fmt: skip
def test_task_code_runs_only_when_allowed(code_task, model_folder, capsys, monkeypatch, flags):
    monkeypatch.chdir(code_task.parent)
    message = "runs Python code (!function local_data.multiple_choice, imported from beside the file)"
    refused(capsys, code_task.parent, cli.main, ["eval", "--model", str(model_folder), *flags], message)
    assert not (code_task.parent / "ran").exists()
    assert cli.main(["eval", "--model", str(model_folder), *flags, "--limit", "2", "--allow_code"]) == 0
    assert (code_task.parent / "ran").exists()


def test_training_runs_task_code_only_when_the_config_allows_it(code_task, capsys, monkeypatch):
    monkeypatch.chdir(code_task.parent)
    (code_task.parent / "input.txt").write_text(CORPUS)
    config = tiny_config(eval_tasks=["tasks/multiple_choice.yaml"], eval_every=2, eval_limit=2)
    (code_task.parent / "tiny.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", "tiny.yaml", "--train_steps", "2", "--out_dir", "run"]
    refused(capsys, code_task.parent, cli.train_main, argv, "train.eval_allow_code: true")
    assert not (code_task.parent / "ran").exists() and not (code_task.parent / "run").exists()
    assert cli.train_main([*argv, "--set", "train.eval_allow_code=true"]) == 0
    assert (code_task.parent / "ran").exists()


def test_eval_outside_a_git_checkout_prints_no_git_error(model_folder, tmp_path):
    task = str(TASKS / "multiple_choice.yaml")
    argv = ["eval", "--model", str(model_folder), "--tasks", task, "--limit", "1", "--allow_code"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # this checkout's smollm2, run from a folder outside any git checkout
    command = [sys.executable, "-m", "smollm2", *argv]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not a git repository" not in result.stderr and "fatal" not in result.stderr, result.stderr
