"""Inputs at their boundaries: sampling settings that float32 cannot hold, counts a checkpoint cannot
carry, weights whose sum overflows, a YAML alias bomb, a Space that publishes only the package's code,
an API call's prompt that is not text, and `~` in a config's paths."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smollm2 import cli
from smollm2.config import ConfigError, load_config
from smollm2.errors import UserError
from smollm2.generation import Sampling, sample
from tests.helpers import ROOT, main_refused, metrics, served_app, snapshot, train_refused

CHECKPOINT = "run/checkpoints/step_4.pt"


def draws(logits: list[float], sampling: Sampling, seen: list[int] = (), times: int = 64) -> set[int]:
    """The tokens `sample` picks from one row of logits, `times` times from one seeded generator."""
    row = torch.tensor([logits])
    context = torch.tensor([list(seen) or [0]])
    valid = torch.tensor([[bool(seen)] * context.shape[1]])
    generator = torch.Generator().manual_seed(0)
    return {int(sample(row, context, valid, sampling, generator)) for _ in range(times)}


def generate(*flags: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "smollm2", "generate", "--checkpoint", CHECKPOINT, "--prompt", "ROMEO:"]
    return subprocess.run(
        [*command, "--max_new_tokens", "5", "--precision", "fp32", *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------------------------------------
# Sampling: a temperature or a penalty float32 rounds to 0 or inf samples, never NaNs (B1, B2)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-46, 1e-39, 1e-30])
def test_a_temperature_too_small_for_float32_samples_as_greedy(temperature):
    assert draws([1.0, 3.0, 2.0], Sampling(temperature=temperature)) == {1}


def test_a_tiny_temperature_still_samples_among_tied_best_tokens():
    assert draws([3.0, 3.0, 1.0], Sampling(temperature=1e-300)) == {0, 1}


@pytest.mark.parametrize("temperature", [1e300, 1e39])
def test_a_temperature_too_large_for_float32_samples_every_token(temperature):
    assert draws([1.0, 3.0, 2.0], Sampling(temperature=temperature)) == {0, 1, 2}


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e-39])
@pytest.mark.parametrize("temperature", [0.0, 0.8, 1e-300])
def test_a_tiny_repetition_penalty_picks_the_seen_token_it_boosts(penalty, temperature):
    # token 1 seen with a positive logit (divided by the penalty), 3 seen negative, 4 seen at zero
    sampling = Sampling(temperature=temperature, repetition_penalty=penalty)
    assert draws([3.0, 1.0, 2.0, -1.0, 0.0], sampling, seen=[1, 3, 4]) == {1}


def test_a_tiny_repetition_penalty_under_a_huge_temperature_samples_every_token():
    # the boosted token's 1e300 over the others', divided by a temperature of 1e300: scores 0 and -1
    sampling = Sampling(temperature=1e300, repetition_penalty=1e-300)
    assert draws([3.0, 1.0, 2.0, -1.0, 0.0], sampling, seen=[1, 3, 4]) == {0, 1, 2, 3, 4}
    # a penalty of 5e-324 makes the boosted logit past float64: held at its largest, still the best by far
    sampling = Sampling(temperature=1e300, repetition_penalty=5e-324)
    assert draws([3.0, 1.0, 2.0, -1.0, 0.0], sampling, seen=[1, 3, 4]) == {1}


@pytest.mark.parametrize("temperature", [0.0, 1e-300])
def test_a_huge_repetition_penalty_damps_seen_tokens_and_a_zero_logit_stays_zero(temperature):
    sampling = Sampling(temperature=temperature, repetition_penalty=1e300)
    assert draws([3.0, 1.0, 2.0, -1.0, 0.0], sampling, seen=[0, 3, 4]) == {2}
    # every token seen, the best of them at zero: 0 x 1e300 is 0, not NaN
    assert draws([-3.0, 0.0, -2.0], sampling, seen=[0, 1, 2]) == {1}


def test_top_p_near_zero_keeps_the_best_token_and_top_k_past_the_vocabulary_keeps_all():
    assert draws([1.0, 3.0, 2.0], Sampling(temperature=1.0, top_p=5e-324)) == {1}
    everything = draws([1.0, 3.0, 2.0], Sampling(temperature=1.0, top_k=0), times=200)
    assert draws([1.0, 3.0, 2.0], Sampling(temperature=1.0, top_k=2**70), times=200) == everything == {0, 1, 2}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": float("inf")}, "temperature must be a number >= 0"),
        ({"temperature": -1e-300}, "temperature must be a number >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be > 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_sampling_settings_past_their_range_are_refused(settings, message):
    with pytest.raises(UserError) as refused:
        Sampling(**settings)
    assert message in str(refused.value)


def test_generate_with_a_temperature_of_1e_300_is_greedy(workspace):
    greedy = generate("--temperature", "0", cwd=workspace)
    tiny = generate("--temperature", "1e-300", cwd=workspace)
    assert tiny.returncode == 0 and greedy.returncode == 0, tiny.stderr
    assert tiny.stdout == greedy.stdout and tiny.stdout.strip()
    assert tiny.stderr == ""


@pytest.mark.parametrize("penalty", ["1e-300", "1e-39"])
def test_generate_with_a_repetition_penalty_float32_cannot_hold_writes_text(workspace, penalty):
    result = generate("--repetition_penalty", penalty, "--temperature", "0.8", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.strip()


# ---------------------------------------------------------------------------------------------
# The app: a prompt or message that is not text is refused, not shown as Python would print it


@pytest.fixture
def app_url(workspace):
    """The repository's app.py serving the workspace run's final/ model."""
    with served_app([str(ROOT / "app.py"), "--model", "run/final"], workspace) as url:
        yield url


def call(app_url: str, api: str, data: list) -> str:
    """The events of one call of the app's API, as a client that skips the browser sends it."""
    import httpx

    url = f"{app_url}gradio_api/call/{api}"
    event = httpx.post(url, json={"data": data}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}/{event}", timeout=60).text


def test_the_apps_api_refuses_a_prompt_or_message_that_is_not_text_and_samples_at_1e_300(app_url):
    for api, data, message in [
        ("generate", [["a"], 5, 0.0, 0, 1.0, 0], "the prompt must be text"),
        ("generate", [7, 5, 0.0, 0, 1.0, 0], "the prompt must be text"),
        ("chat", [["a"], 5, 0.0], "the message must be text"),
        ("chat", [{"text": "a"}, 5, 0.0], "the message must be text"),
    ]:
        events = call(app_url, api, data)
        assert "event: error" in events and message in events, (api, data, events)
    tiny = call(app_url, "generate", ["ROMEO:", 5, 1e-300, 0, 1.0, 0])
    greedy = call(app_url, "generate", ["ROMEO:", 5, 0.0, 0, 1.0, 0])
    assert "event: complete" in tiny, tiny
    assert tiny.split("event: complete")[1] == greedy.split("event: complete")[1]
    assert "event: complete" in call(app_url, "chat", ["hi", 5, 1e-300])


def test_the_apps_generate_with_a_temperature_of_1e_300_is_greedy(workspace):
    from smollm2.app import generator
    from smollm2.inference import load_for_inference

    model, tokenizer = load_for_inference(workspace / "run" / "final", precision="fp32")
    generate_text = generator(model, tokenizer)
    *_, tiny = generate_text("ROMEO:", 6, 1e-300, 0, 1.0, 0)
    *_, greedy = generate_text("ROMEO:", 6, 0.0, 0, 1.0, 0)
    assert tiny == greedy and len(tiny) > len("ROMEO:")


# ---------------------------------------------------------------------------------------------
# data.sources: weights whose sum no float holds are refused before anything is prepared (B7)


def test_weights_whose_sum_overflows_are_refused_before_anything_is_prepared(workspace, capsys):
    (workspace / "small.txt").write_text("a few words of text\n" * 50)
    (workspace / "arithmetic.jsonl").write_text('{"text": "1 + 1 = 2"}\n' * 50)
    sources = "data.sources=[{path: small.txt, weight: 1e308}, {path: arithmetic.jsonl, weight: 1e308}]"
    argv = ["--config", "config/tiny.yaml", "--train_steps", "2", "--out_dir", "fresh", "--set", sources]
    line = train_refused(capsys, workspace, argv, "data.sources in config/tiny.yaml (with --set): the weights add up")
    assert "scale them down" in line
    assert not (workspace / "fresh").exists()


def test_weights_that_are_large_but_sum_to_a_number_are_kept(run_dir):
    sources = "data.sources=[{path: a.txt, weight: 1e307}, {path: b.txt, weight: 3e307}]"
    weights = [s.weight for s in load_config("config/tiny.yaml", [sources]).data.mixture()]
    assert weights == [1e307, 3e307]


def test_a_mixture_of_huge_weights_measures_a_finite_validation_loss(workspace):
    (workspace / "second.txt").write_text((workspace / "input.txt").read_text()[15_000:30_000])
    sources = "data.sources=[{path: input.txt, weight: 1e307}, {path: second.txt, weight: 3e307}]"
    argv = ["--config", "config/tiny.yaml", "--train_steps", "2", "--out_dir", "mix", "--set", sources]
    assert cli.train_main(argv) == 0
    last = metrics(workspace / "mix")[-1]
    assert last["val_loss"] == pytest.approx(0.25 * last["val_loss/input"] + 0.75 * last["val_loss/second"])
    assert (workspace / "mix" / "final").is_dir()


# ---------------------------------------------------------------------------------------------
# Counts a checkpoint carries stay below 2**63 (B9)


def parse_refused(capsys, folder: Path, command, argv: list[str]) -> str:
    """A command line refused as it is parsed: exit 2, one line, every old file untouched."""
    before = snapshot(folder)
    with pytest.raises(SystemExit) as exit:
        command(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(folder) == before
    return err


@pytest.mark.parametrize("steps", [2**63, 2**64])
@pytest.mark.parametrize("command", [cli.train_main, lambda argv: cli.main(["train", *argv])])
def test_train_steps_a_checkpoint_cannot_hold_are_refused_before_anything_is_written(workspace, capsys, command, steps):
    argv = ["--config", "config/tiny.yaml", "--train_steps", str(steps), "--out_dir", "fresh"]
    line = parse_refused(capsys, workspace, command, argv)
    assert line.endswith(
        f"argument --train_steps: must be below 2**63 (a checkpoint holds its steps as int64), got {steps}"
    )
    assert not (workspace / "fresh").exists()


def test_a_schedule_a_checkpoint_cannot_hold_is_refused(workspace, capsys):
    argv = ["info", "--config", "config/tiny.yaml", "--set", f"train.schedule_steps={2**63}"]
    main_refused(capsys, workspace, argv, "train.schedule_steps in config/tiny.yaml (with --set): must be below 2**63")
    assert load_config("config/tiny.yaml", [f"train.schedule_steps={2**63 - 1}"]).train.schedule_steps == 2**63 - 1


# ---------------------------------------------------------------------------------------------
# A YAML alias bomb is refused at once, by its size expanded; an error shows a bounded value (B10)


def alias_bomb(levels: int = 9) -> str:
    """The billion laughs in one flow list: each level ten of the one before (10**levels items expanded)."""
    anchors = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    anchors += [f"&a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, levels)]
    return f"[{', '.join(anchors)}]"


def limited_info(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    """`smollm2 info` with 2 GB of address space and 60 s: a bomb that expands would hit either."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))

    return subprocess.run(
        [sys.executable, "-m", "smollm2", "info", *argv],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_memory,
    )


def one_line_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_an_alias_bomb_in_a_config_file_is_refused_at_once_in_one_line(run_dir):
    config = (run_dir / "config" / "tiny.yaml").read_text().replace("norm: rmsnorm", f"norm: {alias_bomb()}")
    (run_dir / "bomb.yaml").write_text(config)
    assert len(config) < 3000 and alias_bomb() in config
    before = snapshot(run_dir)
    line = one_line_of(limited_info(run_dir, "--config", "bomb.yaml"))
    assert "bomb.yaml" in line and "100,000" in line and len(line) < 300, line
    assert snapshot(run_dir) == before


def test_an_alias_bomb_in_a_set_value_is_refused_at_once_in_one_line(run_dir):
    line = one_line_of(limited_info(run_dir, "--config", "config/tiny.yaml", "--set", f"model.norm={alias_bomb()}"))
    assert "--set" in line and "100,000" in line and len(line) < 300, line


def test_a_yaml_value_that_holds_itself_is_refused_in_one_line(run_dir, capsys):
    (run_dir / "loop.yaml").write_text("model:\n  norm: &loop [*loop]\n")
    main_refused(capsys, run_dir, ["info", "--config", "loop.yaml"], "holds itself")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.norm", "x" * 100_000),
        ("model.norm", list(range(100_000))),
        ("train.prompts", [[["deep"] * 100] * 100]),
        ("data.sources", [{"path": "a.txt", "weight": ["heavy"] * 50_000}]),
    ],
)
def test_an_error_shows_a_bounded_value(run_dir, key, value):
    section, name = key.split(".")
    config = yaml.safe_load((run_dir / "config" / "tiny.yaml").read_text())
    config[section][name] = value
    (run_dir / "big.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as refused:
        load_config(run_dir / "big.yaml")
    assert len(str(refused.value)) < 250 + len(str(run_dir / "big.yaml")), str(refused.value)[:1000]


# ---------------------------------------------------------------------------------------------
# export-space publishes the package's code, nothing else in its folder (B11)


def test_export_space_copies_only_the_packages_python_files(workspace, monkeypatch):
    import smollm2.space

    package = workspace / "package" / "smollm2"
    package.mkdir(parents=True)
    code = sorted(path.name for path in Path(smollm2.space.PACKAGE).glob("*.py"))
    for name in code:
        (package / name).write_bytes((smollm2.space.PACKAGE / name).read_bytes())
    (package / ".env").write_text("HF_TOKEN=hf_secret\n")
    (package / "notes.txt").write_text("my notes\n")
    (package / ".hidden.py").write_text("SECRET = 1\n")
    (package / "scratch").mkdir()
    (package / "scratch" / "draft.py").write_text("DRAFT = 1\n")
    monkeypatch.setattr(smollm2.space, "PACKAGE", package)
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0
    published = workspace / "space" / "smollm2"
    assert sorted(path.name for path in published.iterdir()) == code
    for name in code:
        assert (published / name).read_bytes() == (package / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# ~ in a config's path is the home folder, never a folder named ~


def test_a_path_key_that_starts_with_a_tilde_is_under_the_home_folder(run_dir, monkeypatch):
    home = run_dir / "home"
    monkeypatch.setenv("HOME", str(home))
    settings = [
        "data.prepared_dir=~/prepared",
        "data.path=~/corpus.txt",
        "data.tokenizer=~/tokenizer.json",
        "model.init_from=~/final",
        "train.eval_tasks=[~/task.yaml, hellaswag]",
    ]
    config = load_config("config/tiny.yaml", settings)
    assert config.data.prepared_dir == str(home / "prepared")
    assert (config.data.path, config.data.tokenizer) == (str(home / "corpus.txt"), str(home / "tokenizer.json"))
    assert config.model.init_from == str(home / "final")
    assert config.train.eval_tasks == [str(home / "task.yaml"), "hellaswag"]
    sources = load_config("config/tiny.yaml", ["data.sources=[{path: ~/a.txt, weight: 1}]"]).data
    assert [s.path for s in sources.mixture()] == [str(home / "a.txt")]
    assert sources.sources == [{"path": "~/a.txt", "weight": 1}]  # kept as written: a resume compares it


def test_prepare_into_a_tilde_folder_writes_under_home_not_into_a_folder_named_tilde(workspace, monkeypatch):
    home = workspace / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    argv = ["prepare", "--config", "config/tiny.yaml", "--out_dir", "fresh", "--set", "data.prepared_dir=~/x"]
    assert cli.main(argv) == 0
    assert (home / "x" / "meta.json").is_file()
    assert not (workspace / "~").exists()


def test_a_tilde_of_an_unknown_user_is_refused_in_one_line(workspace, capsys):
    argv = ["prepare", "--config", "config/tiny.yaml", "--set", "data.prepared_dir=~no_such_user_here/x"]
    main_refused(capsys, workspace, argv, "data.prepared_dir in config/tiny.yaml (with --set)")
    assert not list(workspace.glob("~*"))
