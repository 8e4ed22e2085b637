import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smollm2.cli import build_parser
from smollm2.config import ConfigError, load_config
from smollm2.distributed import compiles

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
model:
  n_layers: 2
  hidden_size: 64
  n_heads: 4
  n_kv_heads: 2
  intermediate_size: 128
  vocab_size: 300
train:
  lr: 1.0e-3
"""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_loads_and_overrides_later_values_win(tmp_path):
    path = write(tmp_path, BASE)
    config = load_config(path, ["train.lr=2e-3", "model.n_layers=3", "train.lr=5e-4", "train.prompts=[a, b]"])
    assert config.train.lr == 5e-4
    assert config.model.n_layers == 3
    assert config.train.prompts == ["a", "b"]
    assert config.model.n_kv_heads == 2


def test_n_kv_heads_defaults_to_n_heads(tmp_path):
    config = load_config(write(tmp_path, BASE.replace("  n_kv_heads: 2\n", "")))
    assert config.model.n_kv_heads == 4


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (BASE + "  bogus: 1\n", [], r"unknown key train.bogus in .*c.yaml"),
        (BASE, ["model.hidden_size=big"], r"model.hidden_size in .*c.yaml.*expected int, got 'big'"),
        (BASE, ["model.hidden_size=66"], r"model.hidden_size in .*c.yaml.*66 is not divisible by model.n_heads=4"),
        (BASE, ["model.n_kv_heads=3"], r"model.n_kv_heads in .*not divisible"),
        (BASE, ["model.hidden_size=36", "model.n_heads=12", "model.n_kv_heads=12"], r"head dim 3 .* even"),
        (BASE, ["model.norm=batchnorm"], r"model.norm .*'batchnorm' is not one of layernorm, rmsnorm"),
        (BASE, ["train.lr=-1"], r"train.lr .*must be positive"),
        (BASE, ["model.tie_embeddings=3"], r"expected bool"),
        (BASE, ["train.compile=1"], r"train.compile .*1 is not one of auto, true, false"),
        (BASE, ["train.compile=yes please"], r"train.compile .*'yes please' is not one of auto, true, false"),
        (BASE, ["nosection"], r"expected section.key=value"),
        (BASE, ["optim.lr=1"], r"unknown section 'optim'"),
        ("model: [1, 2\n", [], r"not valid YAML"),
        ("extra:\n  a: 1\n", [], r"unknown section 'extra'"),
    ],
)
def test_config_errors_name_the_key_and_file(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


@pytest.mark.parametrize(
    ("setting", "device", "compiled"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("true", "cpu", True), ("false", "cuda", False)],
)
def test_compile_auto_means_cuda_only(tmp_path, setting, device, compiled):
    config = load_config(write(tmp_path, BASE), [f"train.compile={setting}"])
    assert compiles(config.train, torch.device(device)) is compiled


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "smollm2", *args], capture_output=True, text=True)


def test_cli_error_is_one_line_exit_2_no_traceback(tmp_path):
    path = write(tmp_path, BASE + "  bogus: 1\n")
    result = run_cli("info", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key train.bogus" in result.stderr and "Traceback" not in result.stderr


def test_cli_bad_flag_is_one_line_exit_2():
    result = run_cli("info", "--config", "config/tiny.yaml", "--bogus")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unrecognized arguments" in result.stderr


def test_info_prints_the_breakdown_and_exact_total():
    result = run_cli("info", "--config", "config/model_config.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "total parameters: 134,125,056"
    assert any("lm head" in line and "24,576,000" in line for line in lines)


def test_info_with_set_override():
    result = run_cli("info", "--config", "config/smollm2-135m.yaml", "--set", "model.n_layers=2")
    expected = 28_311_552 + 2 * 3_540_096 + 576
    assert result.stdout.strip().splitlines()[-1] == f"total parameters: {expected:,}"


def help_text(*command: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_SERVER_")}  # they set app.py's defaults
    result = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line(text: str) -> str:
    return " ".join(text.split())  # the same whatever width argparse wrapped to


@pytest.mark.parametrize("command", [("-m", "smollm2", "train"), ("train.py",)])
def test_train_help_shows_the_defaults_and_ends_with_examples(command):
    text = help_text(*command)
    assert "--out_dir OUT_DIR run folder for checkpoints/, logs/, final/ (default: .)" in one_line(text)
    assert "default: None" not in text and "default: []" not in text
    prefix = "python -m smollm2 train" if command[0] == "-m" else "python train.py"
    assert text.rstrip().splitlines()[-3:] == [
        "examples:",
        f"  {prefix} --config config/tiny.yaml --train_steps 600 --out_dir runs/mine --set train.lr=1e-3",
        f"  {prefix} --config config/tiny.yaml --train_steps 50 --out_dir runs/mine "
        "--checkpoint_path runs/mine/checkpoints/step_600.pt",
    ]


def test_generate_help_shows_the_defaults_and_ends_with_examples():
    text = help_text("-m", "smollm2", "generate")
    flat = one_line(text)
    assert "--temperature TEMPERATURE sampling temperature; 0 = greedy (default: 0.8)" in flat
    assert "--top_k TOP_K sample from the k likeliest tokens; 0 = off (default: 50)" in flat
    assert "shorter (default: 100)" in flat and "(default: 1.0)" in flat and "(default: 0)" in flat
    assert "default: None" not in text
    assert text.rstrip().splitlines()[-3:] == [
        "examples:",
        '  python -m smollm2 generate --checkpoint runs/mine/checkpoints/step_600.pt --prompt "ROMEO:"',
        '  python -m smollm2 generate --model runs/mine/final --prompt "ROMEO:" --temperature 0 --max_new_tokens 200',
    ]


def test_every_flag_has_help_and_every_command_examples():
    (commands,) = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands) == {"info", "prepare", "train", "generate", "chat", "eval", "export", "export-space"}
    for name, parser in commands.items():
        assert parser.epilog.startswith("examples:\n  python -m smollm2 " + name), name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings}"


def test_app_help_has_every_flag_explained_and_examples():
    flat = one_line(help_text("app.py"))
    assert "--host HOST address to serve on, or $GRADIO_SERVER_NAME; 0.0.0.0 for every interface" in flat
    assert "--port PORT port to serve on, or $GRADIO_SERVER_PORT (default: 7860)" in flat
    assert flat.endswith(
        "examples: python app.py --model runs/demo/final python app.py --model model --host 0.0.0.0 --port 7861"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.vocab_size=3000000000"],
            "model.vocab_size in tiny.yaml (with --set): 3,000,000,000 tokens is more than 16,777,216 "
            "(the largest tokenizers in use have about 256,000)",
        ),
        (
            ["model.n_layers=200000"],
            "model in tiny.yaml (with --set): about 157,286,924,288 parameters, more than 100,000,000,000 "
            "(400 GB of fp32 weights before the optimizer's state)",
        ),
        (
            ["model.max_seq_len=100000000"],
            "model.max_seq_len in tiny.yaml (with --set): 100,000,000 positions is more than 2,097,152 "
            "(the rotary tables hold every position)",
        ),
        (
            ["train.batch_size=1000000"],
            "train.batch_size in tiny.yaml (with --set): 1,000,000 x data.seq_len 128 is 128,000,000 tokens "
            "a micro-batch, more than 16,777,216 (for larger batches raise train.grad_accum)",
        ),
    ],
)
def test_absurd_sizes_are_refused_before_any_work(tmp_path, monkeypatch, capsys, overrides, message):
    from smollm2 import cli

    (tmp_path / "tiny.yaml").write_text((ROOT / "config" / "tiny.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    for command in (["info"], ["prepare"]):
        assert cli.main([*command, "--config", "tiny.yaml", "--set", *overrides]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
