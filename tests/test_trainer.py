import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from smollm2.checkpoint import load_checkpoint, save_checkpoint
from smollm2.config import TrainConfig, UserError, load_config
from smollm2.model import SmolLM2
from smollm2.trainer import learning_rate, train
from tests.helpers import CORPUS, ROOT, metrics, one_error_line, run_train, tiny_config


def test_resume_is_bitwise_exact(run_dir):
    config = load_config("config/tiny.yaml", ["train.schedule_steps=20"])  # one schedule for both runs
    train(config, 20, None, "full")
    train(config, 10, None, "split")
    train(config, 10, "split/checkpoints/step_10.pt", "split")
    full, split = metrics(run_dir / "full"), metrics(run_dir / "split")
    assert [r["step"] for r in split] == list(range(1, 21))
    assert [r["loss"] for r in split[10:]] == [r["loss"] for r in full[10:]]  # exact float equality
    assert [r["lr"] for r in split] == [r["lr"] for r in full]
    a = load_checkpoint(run_dir / "full/checkpoints/step_20.pt")["model"]
    b = load_checkpoint(run_dir / "split/checkpoints/step_20.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_files_and_final_model(run_dir):
    train(load_config("config/tiny.yaml"), 10, None, "run")
    run = run_dir / "run"
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [5, 10]
    samples = (run / "logs" / "samples.md").read_text()
    assert "## step 5 (train loss" in samples and "## step 10" in samples and "ROMEO:" in samples
    assert (run / "logs" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_10.pt", "step_5.pt"]
    from smollm2.hf import load_pretrained

    model, tokenizer = load_pretrained(run / "final")
    state = load_checkpoint(run / "checkpoints" / "step_10.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    assert tokenizer.hash == state["tokenizer_hash"]


def test_keep_last_prunes_old_checkpoints(run_dir):
    train(load_config("config/tiny.yaml", ["train.save_every=2", "train.keep_last=2"]), 7, None, "run")
    assert sorted(p.name for p in (run_dir / "run/checkpoints").iterdir()) == ["step_6.pt", "step_7.pt"]


def test_learning_rate_schedules():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(5, t, 100) == 0.5
    assert learning_rate(10, t, 100) == 1.0
    assert learning_rate(100, t, 100) == pytest.approx(0.1)
    assert learning_rate(55, t, 100) == pytest.approx(0.55)  # cosine half way
    assert learning_rate(150, t, 100) == 0.1  # past the span: min_lr
    wsd = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(80, wsd, 100) == 1.0
    assert learning_rate(90, wsd, 100) == pytest.approx(0.5)
    assert learning_rate(120, wsd, 100) == 0.0


def test_resume_continues_the_first_runs_schedule(run_dir):
    config = load_config("config/tiny.yaml")
    train(config, 6, None, "run")
    train(config, 4, "run/checkpoints/step_6.pt", "run")
    rows = metrics(run_dir / "run")
    assert rows[-1]["step"] == 10
    assert all(r["lr"] == 3e-4 for r in rows[6:])  # the 6-step schedule ended: min_lr
    assert load_checkpoint(run_dir / "run/checkpoints/step_10.pt")["schedule_steps"] == 6


def test_optimizer_settings_changed_on_a_resume_are_the_ones_it_runs(run_dir):
    base = ["train.schedule_steps=8", "train.save_every=4"]
    train(load_config("config/tiny.yaml", base), 4, None, "run")
    changed = [
        *base,
        "train.weight_decay=0.0",
        "train.beta1=0.8",
        "train.beta2=0.5",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
    ]
    changed_config = load_config("config/tiny.yaml", changed)
    train(changed_config, 4, "run/checkpoints/step_4.pt", "changed")
    # The same resume from a checkpoint whose optimizer already holds the new settings: the reference.
    state = load_checkpoint(run_dir / "run/checkpoints/step_4.pt")
    for group, weight_decay in zip(state["optimizer"]["param_groups"], (0.0, 0.0), strict=True):
        group.update(weight_decay=weight_decay, betas=(0.8, 0.5))
    save_checkpoint(state, run_dir / "edited.pt")
    train(changed_config, 4, "edited.pt", "reference")
    train(load_config("config/tiny.yaml", base), 4, "run/checkpoints/step_4.pt", "unchanged")
    losses = {name: [r["loss"] for r in metrics(run_dir / name)] for name in ("changed", "reference", "unchanged")}
    assert losses["changed"] == losses["reference"] != losses["unchanged"]
    written = load_checkpoint(run_dir / "changed/checkpoints/step_8.pt")
    assert [(g["weight_decay"], g["betas"]) for g in written["optimizer"]["param_groups"]] == [((0.0), (0.8, 0.5))] * 2
    assert [r["lr"] for r in metrics(run_dir / "changed")] == [
        learning_rate(step, changed_config.train, 8) for step in range(5, 9)
    ]


def test_a_run_from_init_from_resumes_when_its_source_is_gone(run_dir):
    train(load_config("config/tiny.yaml"), 2, None, "base")
    config = load_config("config/tiny.yaml", ["model.init_from=base/final", "train.schedule_steps=6"])
    train(config, 6, None, "full")
    train(config, 2, None, "split")
    shutil.rmtree(run_dir / "base")  # the checkpoint holds the weights and the tokenizer
    train(config, 2, "split/checkpoints/step_2.pt", "split")
    train(config, 2, "split/checkpoints/step_4.pt", "split")
    assert [r["loss"] for r in metrics(run_dir / "split")] == [r["loss"] for r in metrics(run_dir / "full")]


def test_a_checkpoint_older_than_run_ids_and_kept_precisions_resumes(run_dir):
    train(load_config("config/tiny.yaml"), 2, None, "run")
    state = load_checkpoint(run_dir / "run/checkpoints/step_2.pt")
    for newer in ("run_id", "precision", "tokens_seen", "chat_template"):
        del state[newer]
    save_checkpoint(state, run_dir / "old.pt")
    train(load_config("config/tiny.yaml"), 1, "old.pt", "older")
    assert load_checkpoint(run_dir / "older/checkpoints/step_3.pt")["precision"] == "fp32"


def test_nan_losses_skip_updates_then_stop_with_the_last_good_state(run_dir, monkeypatch):
    config = load_config("config/tiny.yaml")
    train(config, 2, None, "run")
    good = load_checkpoint(run_dir / "run/checkpoints/step_2.pt")["model"]
    original = SmolLM2.forward

    def poisoned(self, input_ids, targets=None, **kwargs):
        out = original(self, input_ids, targets, **kwargs)
        return out * float("nan") if targets is not None else out

    monkeypatch.setattr(SmolLM2, "forward", poisoned)
    with pytest.raises(
        UserError, match="not finite for 3 steps in a row.*last good checkpoint is run/checkpoints/step_2.pt"
    ):
        train(config, 10, "run/checkpoints/step_2.pt", "run")
    # Nothing was saved over the streak: the newest checkpoint is still the last good one.
    assert sorted(p.name for p in (run_dir / "run/checkpoints").iterdir()) == ["step_2.pt"]
    saved = load_checkpoint(run_dir / "run/checkpoints/step_2.pt")["model"]
    assert all(torch.equal(saved[k], good[k]) for k in good)


def test_bad_inputs_are_one_line_and_leave_checkpoints_untouched(run_dir):
    train(load_config("config/tiny.yaml"), 5, None, ".")
    good = run_dir / "checkpoints" / "step_5.pt"
    before = good.read_bytes()
    cfg = ["--config", "config/tiny.yaml"]
    cases = {
        "missing": (cfg + ["--train_steps", "2", "--checkpoint_path", "checkpoints/nope.pt"], "checkpoint not found"),
        "zero": (cfg + ["--train_steps", "0"], "positive number of steps"),
        "negative": (cfg + ["--train_steps", "-3"], "positive number of steps"),
        "architecture": (
            cfg + ["--set", "model.n_layers=3", "--train_steps", "2", "--checkpoint_path", str(good)],
            "model.n_layers=2 but",
        ),
        "steps flag": (cfg + ["--train_steps", "many"], "invalid int value"),
    }
    (run_dir / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (run_dir / "truncated.pt").write_bytes(before[: len(before) // 2])
    for name in ("garbage.pt", "truncated.pt"):
        cases[name] = (cfg + ["--train_steps", "2", "--checkpoint_path", name], "truncated or corrupt")
    for name, (args, message) in cases.items():
        line = one_error_line(run_train(*args, cwd=run_dir))
        assert message in line, (name, line)
    assert good.read_bytes() == before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_5.pt"]


def test_checkpoint_from_another_tokenizer_is_refused(run_dir):
    train(load_config("config/tiny.yaml"), 2, None, ".")
    (run_dir / "other.txt").write_text(CORPUS.upper())
    result = run_train(
        "--config",
        "config/tiny.yaml",
        "--set",
        "data.path=other.txt",
        "--train_steps",
        "2",
        "--checkpoint_path",
        "checkpoints/step_2.pt",
        cwd=run_dir,
    )
    assert "tokenizer" in one_error_line(result)


def test_checkpoints_load_with_weights_only(run_dir):
    train(load_config("config/tiny.yaml"), 2, None, ".")
    state = torch.load(run_dir / "checkpoints/step_2.pt", weights_only=True)
    assert state["step"] == 2 and state["loader"]["step"] == 4  # 2 steps x 2 micro-batches


# The writer of a save, in a process the test kills: half the checkpoint's bytes written and flushed,
# then it says where it stands and waits, so the kill certainly lands while the save is in flight.
HALF_WRITTEN_SAVE = """
import io, os, sys, threading, torch
from pathlib import Path
from smollm2.checkpoint import save_checkpoint

def half_then_wait(obj, f):
    whole = io.BytesIO()
    torch.serialization.save(obj, whole)
    f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
    f.flush()
    written = os.readlink(f"/proc/self/fd/{f.fileno()}")  # where the bytes go, whatever name f was opened by
    print(f"in flight: {written} {len(whole.getvalue())}", flush=True)
    threading.Event().wait()

torch.save = half_then_wait
save_checkpoint({"weights": torch.ones(1_000_000), "step": 1}, Path(sys.argv[1]))
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"weights": torch.zeros(10), "step": 0}, path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the save is in flight once this line comes
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert line.startswith("in flight: "), line
    written, size = line.split()[2], int(line.split()[3])
    assert Path(written).parent.parent == tmp_path and Path(written) != path  # in a staging folder beside it
    assert Path(written).stat().st_size == size // 2  # half the new checkpoint was on disk at the kill
    assert path.read_bytes() == before  # the real name still holds the previous checkpoint, whole
    state = torch.load(path, weights_only=True)
    assert state["step"] == 0 and torch.equal(state["weights"], torch.zeros(10))


def test_sigterm_saves_a_checkpoint_that_resumes_bitwise(run_dir):
    settings = ["train.save_every=100000", "train.eval_every=100000", "train.predict_every=100000"]
    args = [sys.executable, str(ROOT / "train.py"), "--config", "config/tiny.yaml", "--train_steps", "100000"]
    proc = subprocess.Popen(
        [*args, "--set", *settings], cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics_file = run_dir / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # saved, then the signal's exit code: `train && export-space` stops
    saved = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    step = load_checkpoint(saved[0])["step"]
    assert step >= 3 and "resume with: python train.py --config config/tiny.yaml" in out
    assert f"--checkpoint_path {saved[0].relative_to(run_dir)}" in out
    # The resume it names goes on as the run would have, bitwise: against one run of step + 2 steps
    # whose schedule spans the same 100000 steps.
    train(load_config("config/tiny.yaml", settings), 2, str(saved[0].relative_to(run_dir)), ".")
    reference = [*settings, "train.schedule_steps=100000"]
    train(load_config("config/tiny.yaml", reference), step + 2, None, "uninterrupted")
    resumed, uninterrupted = metrics(run_dir), metrics(run_dir / "uninterrupted")
    assert [r["step"] for r in resumed] == list(range(1, step + 3))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]


def test_seed_commands_end_to_end(tmp_path):
    """The seed's two commands, exactly as written, in a fresh folder (a tiny LayerNorm/GELU config)."""
    (tmp_path / "config").mkdir()
    seed_like = tiny_config(norm="layernorm", mlp="gelu", wandb=True, predict_every=2, save_every=1000)
    seed_like["model"]["tie_embeddings"] = False
    (tmp_path / "config" / "model_config.yaml").write_text(yaml.safe_dump(seed_like))
    (tmp_path / "input.txt").write_text(CORPUS)
    shutil.copy(ROOT / "train.py", tmp_path / "train.py")
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    commands = [
        "python train.py --config config/model_config.yaml --train_steps 4",
        "python train.py --config config/model_config.yaml --train_steps 2 --checkpoint_path checkpoints/step_4.pt",
    ]
    for command in commands:
        argv = [sys.executable] + command.split()[1:]
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4.pt", "step_6.pt"]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    samples = (tmp_path / "logs" / "samples.md").read_text()
    assert all(f"## step {s} " in samples for s in (2, 4, 6))
    assert (tmp_path / "logs" / "loss.png").is_file()
    assert {"model.safetensors", "smollm2_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "final").iterdir()
    }
    assert any((tmp_path / "logs" / "wandb").glob("offline-run-*"))


def test_generate_and_export_commands(run_dir):
    train(load_config("config/tiny.yaml"), 2, None, ".")
    from smollm2.checkpoint import load_model_from_checkpoint
    from smollm2.generation import Sampling, generate

    model, tokenizer = load_model_from_checkpoint("checkpoints/step_2.pt")
    expected = tokenizer.decode(generate(model.eval(), [tokenizer.encode("ROMEO:")], 12, sampling=Sampling(0))[0])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "smollm2",
            "generate",
            "--checkpoint",
            "checkpoints/step_2.pt",
            "--prompt",
            "ROMEO:",
            "--max_new_tokens",
            "12",
            "--temperature",
            "0",
            "--precision",
            "fp32",
        ],
        cwd=run_dir,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    result = subprocess.run(
        [sys.executable, "-m", "smollm2", "export", "--checkpoint", "checkpoints/step_2.pt", "--out", "hf"],
        cwd=run_dir,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    ids = torch.tensor([tokenizer.encode("ROMEO:")])
    torch.testing.assert_close(loaded(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_compiled_training_matches_eager_and_saves_plain_names(run_dir):
    config = load_config("config/tiny.yaml", ["train.schedule_steps=3"])
    train(config, 3, None, "eager")
    train(load_config("config/tiny.yaml", ["train.schedule_steps=3", "train.compile=true"]), 3, None, "compiled")
    eager, compiled = metrics(run_dir / "eager"), metrics(run_dir / "compiled")
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    names = load_checkpoint(run_dir / "compiled/checkpoints/step_3.pt")["model"].keys()
    assert not [name for name in names if "_orig_mod" in name]  # the compiled wrapper's prefix


def test_without_a_terminal_progress_comes_at_an_interval_and_a_summary_is_kept(run_dir, capsys, monkeypatch):
    import smollm2.metrics

    monkeypatch.setattr(smollm2.metrics, "PROGRESS_SECONDS", 0.0)  # a line after every step
    train(load_config("config/tiny.yaml", ["train.eval_every=100"]), 4, None, "run")
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ") and " loss " in line] == [
        "1/4",
        "2/4",
        "3/4",
        "4/4",
    ]
    assert len([line for line in out.splitlines() if line.startswith("speed: ")]) == 1
    summary = json.loads((run_dir / "run/logs/summary.json").read_text())
    assert (summary["first_step"], summary["last_step"], summary["stopped_early"]) == (0, 4, False)
    assert summary["tokens"] == summary["tokens_seen"] == 4 * 4 * 2 * 32  # steps x batch x accum x seq_len
    windows = (35_843 - 1) // 32  # the training split's windows of 33 tokens (data format 2)
    assert summary["epochs"] == pytest.approx(4 * 2 * 4 / windows)
    assert summary["final_loss"] == metrics(run_dir / "run")[-1]["loss"]


def test_a_resume_cuts_back_what_was_logged_after_its_checkpoint(run_dir):
    """A run killed at step 6 after predicting, whose last checkpoint is step 4."""
    config = load_config("config/tiny.yaml", ["train.predict_every=2", "train.save_every=4"])
    train(config, 6, None, "run")
    (run_dir / "run/checkpoints/step_6.pt").unlink()  # as if killed before its last save
    train(config, 2, "run/checkpoints/step_4.pt", "run")
    samples = (run_dir / "run/logs/samples.md").read_text()
    assert [int(line.split()[2]) for line in samples.splitlines() if line.startswith("## step")] == [2, 4, 6]
    assert [r["step"] for r in metrics(run_dir / "run")] == list(range(1, 7))


def test_the_speed_line_leaves_the_first_steps_warm_up_out(tmp_path, capsys, monkeypatch):
    import smollm2.metrics as metrics

    clock = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    log = metrics.RunLog(tmp_path, 0, {}, False, "test")
    reporter = metrics.Reporter(log, 1000, None, metrics.SpeedModel("cpu", 4096, 1.0, None))
    for step, seconds in [(1, 100.0), (2, 101.0), (3, 102.0)]:  # a first step of 100 s, then 1 s each
        clock[0] = seconds
        reporter.step({"step": step, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 4096.0})
    reporter.close()
    speed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed: ")]
    assert speed == [
        f"speed: 1.00 s/step, 4,096 tokens/s on cpu; the 1000 steps take ~{metrics.duration(1000)} at this speed"
    ]
