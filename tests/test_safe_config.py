"""Settings that must mean what they say: `--set` values kept as written, a resumed run measured on
the validation set its first run chose, and prompts checked before any data is prepared."""

import json

import pytest
import torch
import yaml

from smollm2 import cli, data, sft
from smollm2.config import ConfigError, load_config
from tests.helpers import ROOT, main_refused, metrics, tiny_config, train_refused

TRAIN = ["--config", "config/tiny.yaml"]
RESUME = [*TRAIN, "--checkpoint_path", "run/checkpoints/step_4.pt", "--out_dir", "run"]
LONG_PROMPT = "ROMEO: " * 200  # 1,400 characters: far more tokens than the context of 64


# ---------------------------------------------------------------------------------------------
# --set: a string key keeps its text; the others are YAML, refused where YAML would change them


@pytest.mark.parametrize(
    ("setting", "key", "value"),
    [
        ("data.path=shakespeare #es.txt", "path", "shakespeare #es.txt"),  # YAML: a comment, `shakespeare`
        ("data.path=two\nlines.txt", "path", "two\nlines.txt"),  # YAML: one line, `two lines.txt`
        ("data.text_field=1", "text_field", "1"),  # YAML: the number 1
        ("data.tokenizer=true", "tokenizer", "true"),  # YAML: a boolean
        ("data.prepared_dir=prepared #2", "prepared_dir", "prepared #2"),
    ],
)
def test_a_string_key_keeps_the_text_as_given(run_dir, setting, key, value):
    assert getattr(load_config("config/tiny.yaml", [setting]).data, key) == value


def test_keys_that_may_be_unset_are_unset_by_null_or_nothing_and_other_keys_stay_yaml(run_dir):
    config = load_config(
        "config/tiny.yaml",
        ["data.prepared_dir=null", "model.init_from=", "train.wandb_project=1e5", "train.lr=1e-3"]
        + ["model.tie_embeddings=false", "train.compile=true", "train.prompts=[a, 'b #2', \"c\\nd\"]"],
    )
    assert config.data.prepared_dir is None and config.model.init_from is None
    assert config.train.wandb_project == "1e5"  # a string key: YAML would read the number 100000.0
    assert config.train.lr == 0.001 and config.model.tie_embeddings is False and config.train.compile is True
    assert config.train.prompts == ["a", "b #2", "c\nd"]


def test_a_comment_in_the_path_is_the_path_not_the_folder_before_it(workspace, capsys):
    (workspace / "shakespeare").mkdir()
    (workspace / "shakespeare" / "all.txt").write_text((ROOT / "input.txt").read_text()[:20_000])
    argv = ["prepare", *TRAIN, "--set", "data.path=shakespeare #es.txt", "--out_dir", "fresh"]
    err = main_refused(capsys, workspace, argv, "'shakespeare #es.txt' does not exist")
    assert err == "error: data.path: 'shakespeare #es.txt' does not exist"
    assert not (workspace / "fresh").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # a block list: YAML drops `#1` and reads ["First Citizen"]
        ("train.prompts=- First Citizen #1", "'#1' is a YAML comment, which would be dropped from the value"),
        ("train.eval_tasks=[hellaswag] # later arc_easy", "'# later arc_easy' is a YAML comment"),
        ("train.lr=1e-3 # was 3e-4", "'# was 3e-4' is a YAML comment"),
        # a line break inside a string: YAML reads a space
        ("train.prompts=[First\n Citizen]", "YAML reads a line break inside a string as a space"),
        ('data.sources=[{path: "two\n lines.txt", weight: 1}]', "YAML reads a line break inside a string"),
    ],
)
def test_a_yaml_value_that_yaml_would_change_is_refused(run_dir, setting, message):
    with pytest.raises(ConfigError) as refused:
        load_config("config/tiny.yaml", [setting])
    assert str(refused.value).startswith(f"--set {setting!r}: ")
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------------------------------------
# Prompts that do not fit the context: refused as soon as the tokenizer is known, before any data


@pytest.fixture
def tokenized(monkeypatch) -> list[str]:
    """What was tokenized into token files (a corpus) or encoded into rows (conversations)."""
    calls: list[str] = []
    encode_pieces, encode_all = data.encode_pieces, sft.encode_all

    def encoding_pieces(*args, **kwargs):
        calls.append("corpus")
        return encode_pieces(*args, **kwargs)

    def encoding_all(*args, **kwargs):
        calls.append("conversations")
        return encode_all(*args, **kwargs)

    monkeypatch.setattr(data, "encode_pieces", encoding_pieces)
    monkeypatch.setattr(sft, "encode_all", encoding_all)
    return calls


PROMPTS = f"train.prompts=[{json.dumps(LONG_PROMPT)}]"
TOO_LONG = f"error: train.prompts: {LONG_PROMPT[:40]!r}: the prompt is 1,400 characters"


@pytest.mark.parametrize(
    "settings",
    [
        [],  # the tokenizer is trained from the corpus: in memory, then checked
        ["data.tokenizer=run/data/input-320/tokenizer.json"],  # a tokenizer file: checked as soon as it is read
        ["data.sources=[{path: input.txt, weight: 2}, {path: other.txt, weight: 1}]"],  # a mixture's first source
    ],
)
def test_a_prompt_too_long_is_refused_before_any_data_is_prepared(workspace, capsys, tokenized, settings):
    (workspace / "other.txt").write_text((ROOT / "input.txt").read_text()[60_000:80_000])
    argv = [*TRAIN, "--set", PROMPTS, *settings, "--train_steps", "2", "--out_dir", "fresh"]
    err = train_refused(capsys, workspace, argv, "the prompt is")
    assert err.startswith(TOO_LONG)
    assert tokenized == []
    assert not (workspace / "fresh").exists()


def test_a_resume_with_a_prompt_too_long_prepares_nothing(workspace, capsys, tokenized):
    argv = [*RESUME, "--set", PROMPTS, "data.prepared_dir=prepared", "--train_steps", "2"]
    assert train_refused(capsys, workspace, argv, "the prompt is").startswith(TOO_LONG)
    assert tokenized == []
    assert not (workspace / "prepared").exists()


def test_a_chat_prompt_too_long_is_refused_before_the_conversations_are_encoded(workspace, capsys, tokenized):
    lines = (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:200]
    (workspace / "chats.jsonl").write_text("\n".join(lines) + "\n")
    config = tiny_config()
    config["data"] = {"path": "chats.jsonl", "format": "chat", "seq_len": 64, "val_fraction": 0.1}
    (workspace / "chat.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", "chat.yaml", "--set", PROMPTS, "--train_steps", "2", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, f"train.prompts: {LONG_PROMPT[:40]!r} with the chat template is")
    assert tokenized == []
    assert not (workspace / "fresh").exists()


def test_a_resume_whose_corpus_changed_keeps_its_prepared_data(workspace, capsys, tokenized):
    """data.tokenizer=train and an edited corpus: the tokenizer trained from it is not the
    checkpoint's, and is refused before the run's prepared data is rebuilt from other text."""
    with open(workspace / "input.txt", "a") as corpus:
        corpus.write("Zebras quietly juxtapose xylophones. " * 2000)
    train_refused(capsys, workspace, [*RESUME, "--train_steps", "2"], "checkpoint was trained with tokenizer")
    assert tokenized == []


# ---------------------------------------------------------------------------------------------
# A resumed run measures val_loss on the validation set its run chose


def val_rows(run) -> list[dict]:
    return [row for row in metrics(run) if "val_loss" in row]


@pytest.mark.parametrize("checkpoint", ["as written", "older, without validation_batch_size"])
def test_a_resume_in_another_batch_size_measures_the_same_windows(workspace, checkpoint):
    if checkpoint != "as written":
        path = workspace / "run/checkpoints/step_4.pt"
        state = torch.load(path, weights_only=True)
        state.pop("validation_batch_size", None)
        torch.save(state, path)
    # min_lr 0: past its 4-step schedule the run steps with lr 0, so step 5's weights are step 4's.
    argv = [*RESUME, "--set", "train.batch_size=2", "train.min_lr=0", "--train_steps", "1"]
    assert cli.train_main(argv) == 0
    before, after = val_rows(workspace / "run")[-2:]
    assert (before["step"], after["step"], after["lr"]) == (4, 5, 0.0)
    assert after["val_loss"] == before["val_loss"]


def test_a_chat_resume_in_another_batch_size_measures_the_same_rows(workspace):
    lines = (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:400]
    (workspace / "chats.jsonl").write_text("\n".join(lines) + "\n")
    config = tiny_config(prompts=["What is 2 plus 3?"], eval_every=2, save_every=2)
    config["model"] |= {"max_seq_len": 96, "vocab_size": 400}
    config["data"] = {"path": "chats.jsonl", "format": "chat", "seq_len": 96, "val_fraction": 0.2}
    (workspace / "chat.yaml").write_text(yaml.safe_dump(config))
    chat = ["--config", "chat.yaml", "--out_dir", "chat"]
    assert cli.train_main([*chat, "--train_steps", "2"]) == 0
    resume = [*chat, "--checkpoint_path", "chat/checkpoints/step_2.pt", "--train_steps", "1"]
    assert cli.train_main([*resume, "--set", "train.batch_size=3", "train.min_lr=0"]) == 0
    before, after = val_rows(workspace / "chat")[-2:]
    assert (before["step"], after["step"], after["lr"]) == (2, 3, 0.0)
    assert after["val_loss"] == before["val_loss"]


def test_a_resume_that_would_measure_other_windows_or_examples_is_refused(workspace, capsys):
    refusal = "checkpoint was measured with train.eval_batches=2 but config/tiny.yaml says 3"
    train_refused(capsys, workspace, [*RESUME, "--set", "train.eval_batches=3", "--train_steps", "1"], refusal)
    task = "tests/eval_tasks/multiple_choice.yaml"
    path = workspace / "run/checkpoints/step_4.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["train"]["eval_tasks"] = [task]
    torch.save(state, path)
    argv = [*RESUME, "--set", f"train.eval_tasks=[{task}]", "train.eval_limit=7", "--train_steps", "1"]
    train_refused(capsys, workspace, argv, "train.eval_limit=50 but config/tiny.yaml says 7")


def test_a_checkpoint_whose_validation_batch_size_is_not_a_count_is_refused(workspace, capsys):
    path = workspace / "run/checkpoints/step_4.pt"
    state = torch.load(path, weights_only=True)
    state["validation_batch_size"] = "4"
    torch.save(state, path)
    refusal = "its validation_batch_size is not a whole number of windows, 1 or more"
    train_refused(capsys, workspace, [*RESUME, "--train_steps", "1"], refusal)
