"""Weighted mixtures of sources, document masks, datatrove folders and prepare --workers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from smollm2 import cli
from smollm2.config import load_config
from smollm2.data import document_ids, prepare
from smollm2.datatrove_io import tokenize_steps
from smollm2.mixture import BLOCK, MixtureData, MixtureLoader, Source, SourceData, block_counts, prepare_mixture
from smollm2.trainer import train
from tests.helpers import CORPUS, metrics, refused, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ARITHMETIC = (ROOT / "arithmetic.jsonl").read_text().splitlines()[:600]


def fake_mixture(sizes: list[int], weights: list[float], seq_len: int = 4) -> MixtureData:
    """Sources whose tokens say where they come from: source s, token t -> s * 100_000 + t."""
    sources = []
    for index, (size, weight) in enumerate(zip(sizes, weights, strict=True)):
        tokens = np.arange(size, dtype=np.int64) + index * 100_000
        source = Source(name=f"s{index}", path=f"s{index}", weight=weight, text_field="text")
        sources.append(SourceData(source, [tokens], tokens[:0], Path(".")))
    return MixtureData(tokenizer=None, sources=sources)


def window_ids(loader: MixtureLoader, step: int) -> list[int]:
    return loader.batch(step)["input_ids"][:, 0].tolist()


def test_block_counts_follow_the_weights_exactly():
    assert block_counts([0.7, 0.15, 0.08, 0.06, 0.01]).tolist() == [7000, 1500, 800, 600, 100]
    assert block_counts([1, 1, 1]).tolist() == [3334, 3333, 3333]
    assert block_counts([2, 0]).tolist() == [BLOCK, 0]


def test_share_of_windows_matches_the_weights_and_sources_repeat_whole_epochs():
    weights = [0.7, 0.2, 0.1]
    loader = MixtureLoader(fake_mixture([4001, 801, 41], weights), batch_size=8, seq_len=4, seed=3)
    drawn = np.concatenate([[s for s in loader.window_sources(step)] for step in range(2500)])
    share = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(share - weights).max() < 0.005
    # the small source (10 windows) repeats: each epoch visits every one of its windows once
    starts = [w for step in range(200) for w in window_ids(loader, step) if w >= 200_000]
    assert len(starts) >= 30
    for epoch in range(3):
        assert sorted(starts[epoch * 10 : epoch * 10 + 10]) == [200_000 + 4 * i for i in range(10)]
    assert loader.drawn(2500).tolist() == np.bincount(drawn, minlength=3).tolist()


def test_order_is_a_pure_function_of_seed_step_rank_world():
    data = fake_mixture([2001, 401], [0.5, 0.5])
    whole = MixtureLoader(data, batch_size=4, seq_len=4, seed=7)
    ranks = [MixtureLoader(data, batch_size=2, seq_len=4, seed=7, rank=r, world_size=2) for r in range(2)]
    for step in range(30):
        assert window_ids(ranks[0], step) + window_ids(ranks[1], step) == window_ids(whole, step)
    other_seed = MixtureLoader(data, batch_size=4, seq_len=4, seed=8)
    assert [window_ids(other_seed, s) for s in range(5)] != [window_ids(whole, s) for s in range(5)]
    # resume: the state is the position alone
    first = [next(whole)["input_ids"].tolist() for _ in range(7)]
    resumed = MixtureLoader(data, batch_size=4, seq_len=4, seed=7)
    resumed.load_state_dict(whole.state_dict())
    assert next(resumed)["input_ids"].tolist() == next(whole)["input_ids"].tolist()
    assert first[0] == MixtureLoader(data, batch_size=4, seq_len=4, seed=7).batch(0)["input_ids"].tolist()
    whole.close()
    resumed.close()


@pytest.mark.parametrize(("before", "after"), [(4, 8), (8, 4), (3, 5)])
def test_a_mixture_resumed_in_another_batch_size_goes_on_at_the_next_window(before, after):
    data = fake_mixture([401, 81], [0.5, 0.5])  # 100 and 20 windows: both sources repeat
    whole = MixtureLoader(data, batch_size=1, seq_len=4, seed=7)
    expected = [next(whole)["input_ids"].tolist()[0] for _ in range(600)]
    first = MixtureLoader(data, batch_size=before, seq_len=4, seed=7)
    got = [
        row for _ in range(250 // before) for row in next(first)["input_ids"].tolist()
    ]  # 249 with 3: not a multiple of 5
    resumed = MixtureLoader(data, batch_size=after, seq_len=4, seed=7)
    resumed.load_state_dict(first.state_dict())
    got += [row for _ in range(300 // after) for row in next(resumed)["input_ids"].tolist()]
    assert got == expected[: len(got)]
    for loader in (whole, first, resumed):
        loader.close()


def test_a_source_that_runs_out_is_said_in_the_log(capsys):
    loader = MixtureLoader(fake_mixture([4001, 41], [0.5, 0.5]), batch_size=4, seq_len=4, seed=0)
    for _ in range(6):
        next(loader)
    loader.close()
    out = capsys.readouterr().out
    assert "data: source s1 ran out and repeats (epoch 2)" in out
    assert "s0 ran out" not in out


def test_document_ids_count_the_end_of_text_tokens_before_each_token():
    ids = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 0, 3, 4, 5, 6]])
    assert document_ids(ids, eos_id=0).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]


# ---------------------------------------------------------------------------------------------
# Runs on a mixture


def mixture_config(**data_changes) -> dict:
    config = tiny_config(eval_every=4, predict_every=100, save_every=4)
    config["data"].pop("path")
    sources = [{"path": "input.txt", "weight": 0.7}, {"path": "arithmetic.jsonl", "weight": 0.3}]
    config["data"] |= {"sources": sources} | data_changes
    return config


@pytest.fixture
def mix_dir(tmp_path, monkeypatch):
    (tmp_path / "input.txt").write_text(CORPUS[:30_000])
    (tmp_path / "arithmetic.jsonl").write_text("\n".join(ARITHMETIC) + "\n")
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture_config()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_mixture_run_logs_each_sources_val_loss_and_resumes_bitwise(mix_dir):
    config = load_config("mix.yaml", ["train.schedule_steps=8", "data.document_mask=true"])
    train(config, 8, None, "full")
    train(config, 4, None, "split")
    train(config, 4, "split/checkpoints/step_4.pt", "split")
    full, split = metrics(mix_dir / "full"), metrics(mix_dir / "split")
    assert [r["loss"] for r in split[4:]] == [r["loss"] for r in full[4:]]
    last = full[-1]
    assert {"val_loss/input", "val_loss/arithmetic"} <= last.keys()
    assert last["val_loss"] == pytest.approx(0.7 * last["val_loss/input"] + 0.3 * last["val_loss/arithmetic"])
    # what a user sees of it: a line per source in the Space's chart, the mixture on its card
    from smollm2.app import loss_frame
    from smollm2.space import run_facts

    splits = set(loss_frame(full)["split"])
    assert splits == {"train", "val", "val input", "val arithmetic"}
    assert run_facts(mix_dir / "full").training_data() == "`input.txt x 0.7, arithmetic.jsonl x 0.3`"
    # the second source was tokenized with the tokenizer trained on the first
    data = mix_dir / "full" / "data"
    assert (data / "input-320" / "tokenizer.json").read_bytes() == (
        data / "arithmetic-320" / "tokenizer.json"
    ).read_bytes()


def test_a_changed_mixture_is_refused_on_resume(mix_dir, capsys):
    train(load_config("mix.yaml"), 4, None, "run")
    argv = ["--config", "mix.yaml", "--train_steps", "2", "--checkpoint_path", "run/checkpoints/step_4.pt"]
    argv += [
        "--out_dir",
        "run",
        "--set",
        "data.sources=[{path: input.txt, weight: 0.5}, {path: arithmetic.jsonl, weight: 0.5}]",
    ]
    refused(capsys, mix_dir, cli.train_main, argv, "same sources with the same weights")


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("[{path: input.txt, weight: -1}]", "weight must not be negative"),
        ("[{path: input.txt, weight: 0}, {path: arithmetic.jsonl, weight: 0}]", "the weights are all zero"),
        (
            "[{path: input.txt, weight: 1}, {path: nowhere.txt, weight: 1}]",
            "data.sources[1] (nowhere): 'nowhere.txt' does not exist",
        ),
        ("[{path: input.txt, weight: 1}, {path: empty.txt, weight: 1}]", "data.sources[1] (empty): the corpus"),
        ("[{path: input.txt, weight: 1}, {path: input.txt, weight: 1}]", "two sources are named 'input'"),
        ("[{path: input.txt}]", "weight must be a finite number"),
    ],
)
def test_bad_sources_are_one_line_and_touch_nothing(mix_dir, capsys, sources, message):
    (mix_dir / "empty.txt").write_text("")
    assert prepare_mixture(load_config("mix.yaml"), "run", quiet=True)  # something prepared to keep intact
    argv = ["prepare", "--config", "mix.yaml", "--out_dir", "run", "--set", f"data.sources={sources}"]
    refused(capsys, mix_dir, cli.main, argv, message)


def test_a_mixture_of_conversations_is_refused(mix_dir, capsys):
    assert prepare_mixture(load_config("mix.yaml"), "run", quiet=True)
    argv = ["prepare", "--config", "mix.yaml", "--out_dir", "run", "--set", "data.format=chat"]
    refused(capsys, mix_dir, cli.main, argv, "mixtures are of text; data.format: chat reads conversations from")


# ---------------------------------------------------------------------------------------------
# datatrove


def datatrove_tokenize(corpus: Path, tokenizer: Path, out: Path, logs: Path, tasks: int = 1) -> None:
    """datatrove's own pipeline, run locally: read the jsonl, tokenize, end each document with <|endoftext|>."""
    from datatrove.executor import LocalPipelineExecutor

    steps = tokenize_steps(str(corpus), str(tokenizer), str(out), shuffle=False)
    LocalPipelineExecutor(steps, tasks=tasks, logging_dir=str(logs)).run()


def test_datatrove_tokenized_folder_trains_on_the_same_tokens_as_our_prepare(mix_dir):
    pytest.importorskip("datatrove")
    (mix_dir / "math").mkdir()
    (mix_dir / "math" / "a.jsonl").write_text("\n".join(ARITHMETIC) + "\n")
    ours = load_config("mix.yaml", ["data.val_fraction=0"])
    prepared = prepare_mixture(ours, "ours", quiet=True)  # trains the tokenizer on input.txt
    tokenizer = mix_dir / "ours" / "data" / "input-320" / "tokenizer.json"
    datatrove_tokenize(mix_dir / "math", tokenizer, mix_dir / "tokenized", mix_dir / "dt-logs")
    sources = "data.sources=[{path: input.txt, weight: 0.7}, {path: tokenized, weight: 0.3}]"
    theirs = load_config("mix.yaml", ["data.val_fraction=0", sources])
    from_datatrove = prepare_mixture(theirs, "theirs", quiet=True)
    assert isinstance(from_datatrove, MixtureData)
    ours_tokens, their_tokens = prepared.sources[1].train[0], from_datatrove.sources[1].train[0]
    assert len(ours_tokens) > 90_000 and np.array_equal(ours_tokens, their_tokens)
    # with a validation split: the last tenth of the file's documents, cut at a document start
    split = prepare_mixture(load_config("mix.yaml", [sources]), "split", quiet=True).sources[1]
    eos = split.val[-1]
    assert np.array_equal(np.concatenate([split.train[0], split.val]), their_tokens)
    assert split.train[0][-1] == eos and abs(len(split.val) / len(their_tokens) - 0.1) < 0.005
    train(ours, 3, None, "ours")
    train(theirs, 3, None, "theirs")
    assert [r["loss"] for r in metrics(mix_dir / "ours")] == [r["loss"] for r in metrics(mix_dir / "theirs")]


def test_datatrove_folder_of_another_tokenizer_is_refused(mix_dir, capsys):
    pytest.importorskip("datatrove")
    from smollm2.tokenizer import train_tokenizer

    (mix_dir / "math").mkdir()
    (mix_dir / "math" / "a.jsonl").write_text("\n".join(ARITHMETIC[:50]) + "\n")
    train_tokenizer(ARITHMETIC, 300).save(mix_dir / "other.json")
    datatrove_tokenize(mix_dir / "math", mix_dir / "other.json", mix_dir / "tokenized", mix_dir / "dt-logs")
    assert prepare_mixture(load_config("mix.yaml"), "run", quiet=True)
    capsys.readouterr()  # datatrove's own log
    sources = "data.sources=[{path: input.txt, weight: 1}, {path: tokenized, weight: 1}]"
    argv = ["prepare", "--config", "mix.yaml", "--out_dir", "run", "--set", sources]
    refused(capsys, mix_dir, cli.main, argv, "not this run's tokenizer")


def test_datatrove_folder_with_empty_last_files_empty_or_beside_text(mix_dir, capsys):
    pytest.importorskip("datatrove")
    (mix_dir / "math").mkdir()
    (mix_dir / "math" / "a.jsonl").write_text("\n".join(ARITHMETIC[:200]) + "\n")
    assert prepare_mixture(load_config("mix.yaml"), "run", quiet=True)
    tokenizer = mix_dir / "run" / "data" / "input-320" / "tokenizer.json"
    # more tasks than input files (README's --tasks 8 on a small corpus): the last .ds files are empty
    datatrove_tokenize(mix_dir / "math", tokenizer, mix_dir / "tokenized", mix_dir / "dt-logs", tasks=3)
    assert sorted(f.stat().st_size for f in (mix_dir / "tokenized").glob("*.ds"))[:2] == [0, 0]
    sources = "data.sources=[{path: input.txt, weight: 1}, {path: tokenized, weight: 1}]"
    source = prepare_mixture(load_config("mix.yaml", [sources]), "run", quiet=True).sources[1]
    assert len(source.val) > 0  # validation from the last file with tokens, not none
    capsys.readouterr()  # datatrove's own log
    (mix_dir / "empty").mkdir()
    for file in (mix_dir / "tokenized").glob("*"):
        if (mix_dir / "tokenized" / (file.name.split(".ds")[0] + ".ds")).stat().st_size == 0:
            (mix_dir / "empty" / file.name).write_bytes(file.read_bytes())
    (mix_dir / "tokenized" / "notes.txt").write_text("left out\n")
    for folder, message in (
        ("empty", "its .ds files hold no tokens"),
        ("tokenized", "and notes.txt, which would be left out"),
    ):
        sources = f"data.sources=[{{path: input.txt, weight: 1}}, {{path: {folder}, weight: 1}}]"
        argv = ["prepare", "--config", "mix.yaml", "--out_dir", "fresh", "--set", sources]
        refused(capsys, mix_dir, cli.main, argv, message)
        assert not (mix_dir / "fresh").exists()  # refused before the first source was prepared


# ---------------------------------------------------------------------------------------------
# prepare --workers


def test_two_workers_write_the_same_token_files_as_one(mix_dir, monkeypatch):
    from smollm2 import parallel_encode
    from smollm2.tokenizer import train_tokenizer

    train_tokenizer(ARITHMETIC, 320).save(mix_dir / "ours.json")
    settings = ["data.sources=null", "data.path=input.txt", "data.tokenizer=ours.json"]
    one = prepare(load_config("mix.yaml", settings), "one", quiet=True)
    monkeypatch.setattr(parallel_encode, "BATCH_CHARACTERS", 5_000)  # many batches, both workers busy, in order
    two = prepare(load_config("mix.yaml", settings), "two", quiet=True, workers=2)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (one.folder / name).read_bytes() == (two.folder / name).read_bytes()
    assert one.meta["train_tokens"] > 5_000 and one.meta["val_tokens"] > 500
    # the command line, as a user runs it: the workers must not run the CLI again
    argv = ["prepare", "--config", "mix.yaml", "--out_dir", "cli", "--workers", "2", "--set", *settings]
    result = subprocess.run([sys.executable, "-m", "smollm2", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (mix_dir / "cli" / "data" / "input-320" / "train.bin").read_bytes() == (
        one.folder / "train.bin"
    ).read_bytes()


def _tokenize_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("datatrove_tokenize", ROOT / "scripts" / "datatrove_tokenize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_datatrove_script_writes_each_out_with_logs_of_its_own(mix_dir, capsys):
    pytest.importorskip("datatrove")
    tokenize = _tokenize_script()
    assert prepare_mixture(load_config("mix.yaml"), "run", quiet=True)
    tokenizer = str(mix_dir / "run" / "data" / "input-320" / "tokenizer.json")
    for name, lines in (("first", ARITHMETIC[:100]), ("second", ARITHMETIC[100:300])):
        (mix_dir / name).mkdir()
        (mix_dir / name / "a.jsonl").write_text("\n".join(lines) + "\n")
        assert tokenize(["--input", name, "--tokenizer", tokenizer, "--out", f"{name}-tokens"]) == 0
    first, second = (sum(f.stat().st_size for f in (mix_dir / f"{n}-tokens").glob("*.ds")) for n in ("first", "second"))
    assert 0 < first < second  # the second run tokenized its own input, not skipped as the first's
    capsys.readouterr()
    argv = ["--input", "second", "--tokenizer", tokenizer, "--out", "first-tokens"]
    refused(capsys, mix_dir, tokenize, argv, "--out first-tokens already holds files: choose a new or empty folder")
    refused(capsys, mix_dir, tokenize, [*argv[:-1], "fresh", "--resume"], "--resume: fresh/logs holds no earlier run")
    refused(capsys, mix_dir, tokenize, ["--input", "nowhere", *argv[2:]], "--input nowhere is not a folder")
    before = {f.name: f.read_bytes() for f in (mix_dir / "first-tokens").glob("*.ds")}
    assert tokenize(["--input", "first", "--tokenizer", tokenizer, "--out", "first-tokens", "--resume"]) == 0
    assert {f.name: f.read_bytes() for f in (mix_dir / "first-tokens").glob("*.ds")} == before
