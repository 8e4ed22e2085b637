"""The Space: export-space's folder, the push's failures, the app through gradio_client and a browser."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import gradio
import pytest
import torch
import yaml

from smollm2.config import load_config
from smollm2.generation import Sampling
from smollm2.hf import load_pretrained
from smollm2.inference import load_for_inference, stream_text
from smollm2.metrics import read_samples
from smollm2.trainer import train
from tests.test_trainer import CORPUS, ROOT, tiny_config

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A 10-step run with predictions at steps 5 and 10, exported as a Space folder."""
    folder = tmp_path_factory.mktemp("space")
    (folder / "input.txt").write_text(CORPUS)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tiny_config()))
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        train(load_config("tiny.yaml"), 10, None, "run")
    finally:
        os.chdir(cwd)
    result = cli("export-space", "--run", str(folder / "run"), "--out", str(folder / "out"))
    assert result.returncode == 0, result.stderr
    return folder


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smollm2", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_exported_space_has_every_file_and_valid_front_matter(space):
    out = space / "out"
    for name in ["app.py", "requirements.txt", "README.md", "model/model.safetensors", "model/config.json",
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(space):
    """The exported Space's own app.py, run from its folder (its copy of smollm2 comes first on the path)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLLM2_")} | {"GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)],
        cwd=space / "out",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    yield f"http://127.0.0.1:{port}/"
    process.terminate()
    process.wait(timeout=30)


def test_app_answers_a_generate_call_through_gradio_client(app_url, space):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    text = client.predict("ROMEO:", 12, 0.0, 0, 1.0, 0, api_name="/generate")
    model, tokenizer = load_for_inference(space / "run" / "final")
    expected = "".join(stream_text(model, tokenizer, "ROMEO:", 12, Sampling(temperature=0)))
    assert text == "ROMEO:" + expected
    assert len(expected) > 0


def test_in_a_browser_generate_streams_text_and_training_shows_predictions(app_url, space):
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
        page = browser.new_page()
        page.goto(app_url)
        page.get_by_label("Prompt", exact=True).fill("JULIET:")
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
        browser.close()


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
