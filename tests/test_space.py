"""The Space: export-space's folder and card, the push's failures, the app through gradio_client and a browser."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gradio
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, SpaceCard

from smollm2.config import ModelConfig, load_config
from smollm2.generation import Sampling
from smollm2.hf import load_pretrained
from smollm2.inference import load_for_inference, stream_text
from smollm2.metrics import read_samples
from smollm2.space import (
    NEUTRAL_PROMPT,
    RunFacts,
    RunRecord,
    known_corpus,
    opening_prompt,
    run_facts,
    short_count,
    space_readme,
)
from smollm2.trainer import train
from tests.helpers import CORPUS, ROOT, served_app, tiny_config

CHROMIUM = Path("/usr/bin/chromium")
PROMPTS = ["KING HENRY VI:", "ROMEO:"]  # the first is what the app starts with
TINY_SHAKESPEARE = ROOT / "input.txt"


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A 10-step run with predictions at steps 5 and 10, exported as a Space folder."""
    folder = tmp_path_factory.mktemp("space")
    (folder / "input.txt").write_text(CORPUS)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(prompts=PROMPTS)))
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        train(load_config("tiny.yaml"), 10, None, "run")
    finally:
        os.chdir(cwd)
    result = cli("export-space", "--run", str(folder / "run"), "--out", str(folder / "out"))
    assert result.returncode == 0, result.stderr
    return folder


def cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smollm2", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_exported_space_has_every_file_and_valid_front_matter(space):
    out = space / "out"
    for name in ["app.py", "requirements.txt", "README.md", "run.json", "model/model.safetensors", "model/config.json",
                 "model/tokenizer.json", "logs/metrics.jsonl", "logs/samples.md", "logs/loss.png"]:  # fmt: skip
        assert (out / name).is_file(), name
    package = sorted(p.name for p in (ROOT / "smollm2").glob("*.py"))
    assert sorted(p.name for p in (out / "smollm2").glob("*.py")) == package
    meta = front_matter((out / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == gradio.__version__
    assert {"title", "emoji", "colorFrom", "colorTo", "short_description"} <= set(meta)
    assert f"torch=={torch.__version__.split('+')[0]}" in (out / "requirements.txt").read_text().splitlines()
    card = (out / "README.md").read_text()
    model, _ = load_pretrained(out / "model")
    assert f"| parameters | {model.num_parameters():,} |" in card
    assert "| steps | 10 |" in card and "final val loss" in card
    assert read_samples(out / "logs" / "samples.md")[-1].texts[0] in card  # the latest sample


def test_card_metadata_parses_with_huggingface_hubs_card_tools(space):
    readme = (space / "out" / "README.md").read_text()
    model, _ = load_pretrained(space / "out" / "model")
    space_card = SpaceCard(readme).data
    assert space_card.title == f"SmolLM2 {short_count(model.num_parameters())}"
    assert (space_card.sdk, space_card.app_file, space_card.license) == ("gradio", "app.py", "apache-2.0")
    assert space_card.tags == ["smollm2", "text-generation", "pytorch", "causal-lm"]
    model_card = ModelCard(readme).data
    assert (model_card.license, model_card.pipeline_tag) == ("apache-2.0", "text-generation")
    assert model_card.datasets is None and model_card.base_model is None  # no Hub dataset known; from scratch


def test_card_names_the_run_and_its_corpus_without_guessing(space):
    card = (space / "out" / "README.md").read_text()
    # The run read a 60 KB piece of input.txt, not tiny Shakespeare's bytes: named by its path alone.
    assert "trained from scratch with smollm2 (the run `run`) on `input.txt`. The **Generate**" in card
    assert "Shakespeare" not in card
    assert json.loads((space / "out" / "run.json").read_text()) == {
        "name": "run",
        "data_path": "input.txt",
        "corpus": None,
        "prompts": PROMPTS,
    }
    unknown = space_readme(RunRecord(ModelConfig(), 1000, [], []), RunFacts("r"))
    assert "(the run `r`); its training data is not recorded with the run." in unknown
    known = space_readme(RunRecord(ModelConfig(), 1000, [], []), RunFacts("r", "input.txt", "tiny Shakespeare"))
    assert "(the run `r`) on tiny Shakespeare (`input.txt`). The **Generate**" in known


def test_a_corpus_is_named_only_when_its_bytes_are_known(tmp_path):
    stat = TINY_SHAKESPEARE.stat()
    assert known_corpus([[str(TINY_SHAKESPEARE), stat.st_size, stat.st_mtime_ns]]) == "tiny Shakespeare"
    assert known_corpus([[str(TINY_SHAKESPEARE), stat.st_size, stat.st_mtime_ns + 1]]) is None  # changed since
    edited = tmp_path / "input.txt"
    edited.write_bytes(TINY_SHAKESPEARE.read_bytes().replace(b"ROMEO", b"ROMEA", 1))
    edited_stat = edited.stat()
    assert known_corpus([[str(edited), edited_stat.st_size, edited_stat.st_mtime_ns]]) is None
    assert known_corpus([]) is None


def test_a_run_on_tiny_shakespeare_names_it(tmp_path, monkeypatch):
    shutil.copy(TINY_SHAKESPEARE, tmp_path / "input.txt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(save_every=1)))
    monkeypatch.chdir(tmp_path)
    train(load_config("tiny.yaml"), 1, None, "run")
    assert run_facts(tmp_path / "run") == RunFacts("run", "input.txt", "tiny Shakespeare", ["ROMEO:"])
    (tmp_path / "input.txt").write_text(CORPUS)  # no longer what the run read: named by its path alone
    assert run_facts(tmp_path / "run") == RunFacts("run", "input.txt", None, ["ROMEO:"])


@pytest.mark.parametrize(
    ("count", "label"),
    [(999, "999"), (25_154, "25K"), (3_670_016, "3.7M"), (9_960_000, "10M"), (134_515_008, "135M"),
     (1_711_376_384, "1.7B")],
)  # fmt: skip
def test_parameter_counts_keep_a_decimal_below_ten(count, label):
    assert short_count(count) == label
    card = space_readme(RunRecord(ModelConfig(), count, [], []), RunFacts("r"))
    assert SpaceCard(card).data.title == f"SmolLM2 {label}"


def test_card_shows_transformers_code_that_runs(space):
    card = (space / "out" / "README.md").read_text()
    code = card.split("## Use it with transformers")[1].split("```python\n")[1].split("```")[0]
    assert 'AutoModelForCausalLM.from_pretrained("model")' in code and "inputs = tokenizer('KING HENRY VI:'" in code
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=space / "out"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("KING HENRY VI:") and len(result.stdout) > len("KING HENRY VI:\n")


def test_card_of_a_model_transformers_cannot_load_shows_the_smollm2_way():
    config = ModelConfig(norm="layernorm", mlp="gelu")
    card = space_readme(RunRecord(config, 1000, [], []), RunFacts("r", prompts=["First Citizen:"]))
    assert "AutoModelForCausalLM" not in card and "## Use it with transformers" not in card
    assert "Its architecture (model.norm=layernorm) has no transformers equivalent" in card
    assert "python -m smollm2 generate --model model --prompt 'First Citizen:' --max_new_tokens 100\n" in card


def test_export_space_of_dot_names_the_run_by_its_folder(space, tmp_path):
    result = cli("export-space", "--run", ".", "--out", str(tmp_path / "out"), cwd=space / "run")
    assert result.returncode == 0, result.stderr
    assert "(the run `run`)" in (tmp_path / "out" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["name"] == "run"


def test_the_app_starts_with_the_runs_first_prompt(space, tmp_path):
    from smollm2.app import build_app

    run = space / "run"
    assert opening_prompt(space / "out" / "model") == PROMPTS[0]  # the Space's run.json
    assert opening_prompt(run / "final") == PROMPTS[0]  # the run's latest checkpoint
    assert opening_prompt(run / "checkpoints" / "step_10.pt") == PROMPTS[0]
    shutil.copytree(run / "final", tmp_path / "downloaded")
    assert opening_prompt(tmp_path / "downloaded") == NEUTRAL_PROMPT == "Once upon a time"
    app = build_app(space / "out" / "model", None)
    (prompt,) = [block for block in app.blocks.values() if getattr(block, "label", None) == "Prompt"]
    assert prompt.value == "KING HENRY VI:"


def test_weights_get_the_umask_mode_like_every_other_file(space):
    umask = os.umask(0)
    os.umask(umask)
    for folder in (space / "out" / "model", space / "run" / "final"):
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, folder / name


def test_tokenizer_config_carries_the_models_context(space):
    for folder in (space / "out" / "model", space / "run" / "final"):
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_generate_says_when_the_context_cuts_the_continuation(space):
    model = str(space / "out" / "model")
    ours, tokenizer = load_for_inference(model)
    prompt_tokens = len(tokenizer.encode("ROMEO:"))
    longest = "".join(stream_text(ours, tokenizer, "ROMEO:", 64 - prompt_tokens, Sampling(temperature=0)))
    result = cli("generate", "--model", model, "--prompt", "ROMEO:", "--max_new_tokens", "700", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"note: the continuation is cut to {64 - prompt_tokens} tokens by the model's context "
        f"(64 tokens, {prompt_tokens} of them the prompt's)"
    ]
    assert result.stdout == longest + "\n"
    within = cli("generate", "--model", model, "--prompt", "ROMEO:", "--max_new_tokens", "5", "--temperature", "0")
    assert within.returncode == 0 and within.stderr == ""


def test_exported_weights_are_the_runs(space):
    theirs, _ = load_pretrained(space / "run" / "final")
    ours, _ = load_pretrained(space / "out" / "model")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_export_of_a_missing_run_fails_cleanly_and_keeps_the_old_folder(space, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(space / "out", out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    result = cli("export-space", "--run", str(tmp_path / "nope"), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run folder"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def offline_env(tmp_path: Path, token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # no stored login, no network
    if token:
        env["HF_TOKEN"] = token
    return env


def test_push_without_a_token_fails_in_one_line_and_leaves_the_folder(space, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "export-space",
        "--run",
        str(space / "run"),
        "--out",
        str(out),
        "--push",
        "me/smol",
        env=offline_env(tmp_path, None),
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: no Hugging Face token")
    assert (out / "model" / "model.safetensors").is_file() and (out / "app.py").is_file()


def test_push_without_network_fails_in_one_line(space, tmp_path):
    out = tmp_path / "out"
    env = offline_env(tmp_path, "hf_not_a_real_token")
    result = cli("export-space", "--run", str(space / "run"), "--out", str(out), "--push", "me/smol", env=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: could not push {out} to the Space me/smol")
    assert (out / "README.md").is_file()


# ---------------------------------------------------------------------------------------------
# The running app


@pytest.fixture(scope="module")
def app_url(space):
    """The exported Space's own app.py, run from its folder (its copy of smollm2 comes first on the path)."""
    with served_app(["app.py"], space / "out") as url:
        yield url


def test_app_answers_a_generate_call_through_gradio_client(app_url, space):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    text = client.predict("ROMEO:", 12, 0.0, 0, 1.0, 0, api_name="/generate")
    model, tokenizer = load_for_inference(space / "run" / "final")
    expected = "".join(stream_text(model, tokenizer, "ROMEO:", 12, Sampling(temperature=0)))
    assert text == "ROMEO:" + expected
    assert len(expected) > 0


@contextlib.contextmanager
def chromium():
    """Debian's chromium through playwright (the test skips without it): no browser download."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
        yield browser
        browser.close()


def test_in_a_browser_generate_streams_text_and_training_shows_predictions(app_url, space):
    with chromium() as browser:
        page = browser.new_page()
        page.goto(app_url)
        # the prompt box (the first text box) has no label of its own to find it by once its limit is shown
        page.get_by_test_id("textbox").first.fill("JULIET:")
        page.get_by_role("button", name="Generate").click()
        output = page.get_by_label("Prompt and continuation")
        page.wait_for_function(
            "el => el.value.startsWith('JULIET:') && el.value.length > 'JULIET:'.length",
            arg=output.element_handle(),
            timeout=60_000,
        )
        page.get_by_role("tab", name="Training").click()
        first = read_samples(space / "out" / "logs" / "samples.md")[0]
        page.get_by_text(f"step {first.step}", exact=False).first.wait_for(timeout=30_000)
        assert page.get_by_text("Predictions as it learned").is_visible()
        body = page.inner_text("body")
        assert first.texts[0].splitlines()[-1].strip() in body
        model, _ = load_pretrained(space / "out" / "model")
        assert f"{model.num_parameters():,}" in body  # the summary counts the weights packing replaced


def test_app_without_a_model_says_so_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no model there (run `make demo` first, or pass --model)"
    ]


def test_app_answers_a_chat_call_through_gradio_client(app_url, space):
    from gradio_client import Client

    from smollm2.chat import reply_after

    client = Client(app_url, verbose=False)
    reply = client.predict("Who are you?", 10, 0.0, api_name="/chat")
    model, tokenizer = load_for_inference(space / "run" / "final")
    expected = list(reply_after(model, tokenizer, [], "Who are you?", 10, Sampling(temperature=0)))[-1]
    assert reply == expected and len(expected) > 0


def set_number(page, setting: str, value: str) -> None:
    """Type a value into a slider's number box until the slider shows it (a busy page can miss the first)."""
    slider = page.get_by_label(f"range slider for {setting}").filter(visible=True)
    number = page.get_by_label(f"number input for {setting}").filter(visible=True)
    for _ in range(5):
        number.fill(value)
        number.press("Tab")
        with contextlib.suppress(Exception):
            page.wait_for_function(f"el => el.value === '{value}'", arg=slider.element_handle(), timeout=10_000)
            return
    assert slider.input_value() == value, f"the {setting} slider shows {slider.input_value()!r}, not {value!r}"


def test_in_a_browser_the_chat_tab_answers(app_url, space):
    from smollm2.chat import reply_after

    # The tab's default reply length (63 tokens here) leaves no room in this model's 64-token context
    # for the message, and this 10-step model's greedy reply is only newlines: the reply is set to 20
    # tokens at temperature 1, which the tab samples with seed 0, so the reply is known.
    model, tokenizer = load_for_inference(space / "out" / "model", precision="fp32")
    reply = list(reply_after(model, tokenizer, [], "Who are you?", 20, Sampling(temperature=1.0, top_k=50)))[-1]
    expected = " ".join(reply.split())  # as the page shows it: rendered text, whitespace folded
    assert expected, repr(reply)
    with chromium() as browser:
        page = browser.new_page()
        page.goto(app_url)
        page.get_by_role("tab", name="Chat").click()
        box = page.get_by_role("textbox").filter(visible=True).last
        box.wait_for(timeout=60_000)
        page.get_by_text("Additional inputs").click()
        for setting, value in (("max new tokens", "20"), ("temperature (0 = greedy)", "1")):
            set_number(page, setting, value)
        box.fill("Who are you?")
        page.wait_for_function("el => el.value === 'Who are you?'", arg=box.element_handle(), timeout=30_000)
        box.press("Enter")
        bot = page.locator(".message.bot, [data-testid='bot']").filter(visible=True).first
        bot.wait_for(timeout=60_000)
        folded = "el.innerText.split(/\\s+/).filter(Boolean).join(' ')"
        with contextlib.suppress(Exception):  # the streamed reply, complete; if not, the assert says what came
            page.wait_for_function(f"([el, text]) => {folded} === text", arg=[bot.element_handle(), expected])
        assert " ".join(bot.inner_text().split()) == expected
        assert page.get_by_text("Who are you?").first.is_visible()


def test_export_of_a_run_whose_samples_are_not_utf8_is_one_line(space, tmp_path, capsys):
    from smollm2 import cli
    from tests.helpers import refused

    shutil.copytree(space / "run", tmp_path / "run")
    with open(tmp_path / "run" / "logs" / "samples.md", "ab") as f:
        f.write(b"caf\xe9\n")
    argv = ["export-space", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    refused(capsys, tmp_path, cli.main, argv, "samples.md: not UTF-8 text (byte ")
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_keeps_the_bytes_of_its_samples(tmp_path):
    from smollm2.metrics import samples_up_to

    samples = tmp_path / "samples.md"
    samples.write_bytes(
        b"# Predictions during training\n\n## step 5 (loss 1)\n\n```text\ncaf\xe9\n```\n\n## step 9 (loss 2)\n"
    )
    assert (
        samples_up_to(samples, 5) == b"# Predictions during training\n\n## step 5 (loss 1)\n\n```text\ncaf\xe9\n```\n"
    )


def test_the_app_refuses_a_prompt_longer_than_the_context_holds_before_tokenizing_it(app_url, space):
    """A 2-million-character prompt or message: refused by its length (the old refusal, after tokenizing
    it whole, said "N tokens"); the UI says the limit and the browser stops typing there."""
    from gradio_client import Client

    _, tokenizer = load_for_inference(space / "out" / "model")
    most = tokenizer.max_chars(63)
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match=f"the prompt is 2,000,000 characters, .*at most {most:,} characters"):
        client.predict("a" * 2_000_000, 12, 0.0, 0, 1.0, 0, api_name="/generate")
    with pytest.raises(Exception, match=f"the message is 2,000,000 characters, .*at most {most:,} characters"):
        client.predict("a" * 2_000_000, 10, 0.0, api_name="/chat")
    assert client.predict("ROMEO:", 4, 0.0, 0, 1.0, 0, api_name="/generate").startswith("ROMEO:")  # still serving
    boxes = [c["props"] for c in client.config["components"] if c["type"] == "textbox" and c["props"].get("max_length")]
    assert [box["max_length"] for box in boxes] == [most, most]  # the prompt's and the chat's
    shown = [c["props"].get("value") for c in client.config["components"] if c["type"] == "markdown"]
    assert any(f"at most {most:,} characters" in str(text) and "up to 16 wait in line" in str(text) for text in shown)


def test_the_apps_queue_is_bounded_and_runs_one_request_at_a_time(space):
    from smollm2.app import QUEUE_SIZE, build_app

    app = build_app(space / "out" / "model", None)
    assert app._queue.max_size == QUEUE_SIZE == 16
    assert {fn.concurrency_limit for fn in app.fns.values()} == {"default"}
    assert app._queue.default_concurrency_limit == 1


def test_export_of_a_run_whose_metrics_hold_a_non_number_still_writes_the_card(space, tmp_path):
    shutil.copytree(space / "run", tmp_path / "run")
    last = json.loads((tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    with open(tmp_path / "run" / "logs" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 11, "loss": "abc", "tokens": "many", "val_loss": None}) + "\n")
    result = cli("export-space", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| final train loss | {last['loss']:.4f} |" in card and "| tokens seen | " not in card


def call_raw(app_url: str, api: str, body: str) -> str:
    """One API call as a hostile client sends it (NaN, Infinity and null are JSON gradio reads): the event stream."""
    import httpx

    url = f"{app_url}gradio_api/call/{api}"
    event = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}/{event}", timeout=60).text


@pytest.mark.parametrize(
    "api, data, message",
    [
        ("generate", '["ROMEO:", NaN, 0.0, 0, 1.0, 0]', "max_new_tokens must be a whole number"),
        ("generate", '["ROMEO:", 5, 0.5, NaN, 1.0, 0]', "top_k must be a whole number"),
        ("generate", '["ROMEO:", 5, 0.5, Infinity, 1.0, 0]', "top_k must be a whole number"),
        ("generate", '["ROMEO:", 5.5, 0.0, 0, 1.0, 0]', "max_new_tokens must be a whole number"),
        ("generate", '["ROMEO:", 5, 0.0, 0, 1.0, NaN]', "seed must be a whole number"),
        ("generate", '["ROMEO:", 5, 0.0, 0, 1.0, Infinity]', "seed must be a whole number"),
        ("generate", '["ROMEO:", 5, 0.0, 0, 1.0, null]', "seed must be a whole number"),
        ("generate", "[null, 5, 0.0, 0, 1.0, 0]", "the prompt is missing"),
        ("generate", '["ROMEO:", null, 0.0, 0, 1.0, 0]', "max_new_tokens must be a whole number"),
        ("chat", "[null, 5, 0.0]", "the message is missing"),
        ("chat", '["hi", NaN, 0.0]', "max_new_tokens must be a whole number"),
        ("chat", '["hi", 5, null]', "temperature must be a number"),
    ],
)
def test_the_apps_api_answers_nan_inf_and_null_inputs_with_a_message(app_url, api, data, message):
    events = call_raw(app_url, api, f'{{"data": {data}}}')
    assert "event: error" in events and message in events, events
    assert "event: complete" in call_raw(app_url, "generate", '{"data": ["ROMEO:", 3, 0.0, 0, 1.0, 0]}')
