"""Settings that must mean what they say: `--set` values kept as written, a resumed run measured on
the validation set its first run chose, and prompts checked before any data is prepared."""

import pytest

from smollm2.config import ConfigError, load_config
from tests.helpers import ROOT, main_refused

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
