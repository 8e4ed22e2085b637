"""CPU precision chosen by measurement, and bf16 training that tracks fp32 and resumes bitwise."""

import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import smollm2.hardware
from smollm2.config import load_config
from smollm2.hardware import choose_precision, cpu_bf16_speedup
from smollm2.trainer import train
from tests.conftest import small_config
from tests.helpers import metrics

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("speedup", "dtype", "reason"),
    [
        (2.5, torch.bfloat16, "auto: bf16 matmul 2.5x fp32 on this CPU"),
        (1.1, None, "auto: bf16 matmul 1.1x fp32 on this CPU"),  # not clearly faster: fp32
        (0.013, None, "auto: bf16 matmul 0.013x fp32 on this CPU"),  # a CPU without bf16 units
    ],
)
def test_auto_on_a_cpu_follows_the_measurement(monkeypatch, speedup, dtype, reason):
    monkeypatch.setattr(smollm2.hardware, "cpu_bf16_speedup", lambda config, rows: speedup)
    chosen = choose_precision("auto", CPU, small_config(), 1024)
    assert (chosen.dtype, chosen.reason) == (dtype, reason)


def test_explicit_choices_are_kept_and_slow_bf16_is_said(monkeypatch, capsys):
    def never(config, rows):
        raise AssertionError("fp32 needs no measurement")

    monkeypatch.setattr(smollm2.hardware, "cpu_bf16_speedup", never)
    assert choose_precision("fp32", CPU, small_config(), 1024).dtype is None
    monkeypatch.setattr(smollm2.hardware, "cpu_bf16_speedup", lambda config, rows: 0.01)
    assert choose_precision("bf16", CPU, small_config(), 1024).dtype == torch.bfloat16
    assert "training will be slower than fp32" in capsys.readouterr().err


class MatmulClock(TorchFunctionMode):
    """A clock the test sets: each matmul advances it by its multiply-adds x a cost per dtype."""

    def __init__(self, cost: dict[torch.dtype, float]) -> None:
        super().__init__()
        self.cost, self.now, self.calls = cost, 0.0, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.matmul:  # what `a @ b` dispatches as
            a, b = args
            self.now += a.shape[0] * a.shape[1] * b.shape[1] * self.cost[a.dtype]
            self.calls[a.dtype] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("bf16_cost", "speedup", "bf16_matmuls"),
    [
        (0.4e-9, 2.5, 3 + 3 + 3 + 9),  # warm-up and one round, then a closer look: warm-up and 3 rounds
        (100e-9, 0.01, 3 + 3),  # a CPU without bf16 units: one round is enough to tell
    ],
)
def test_the_measurement_is_the_ratio_of_the_timed_matmuls(monkeypatch, bf16_cost, speedup, bf16_matmuls):
    clock = MatmulClock({torch.float32: 1e-9, torch.bfloat16: bf16_cost})
    monkeypatch.setattr(smollm2.hardware, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    with clock:
        measured = cpu_bf16_speedup(small_config(hidden_size=128, intermediate_size=256), rows=256)
    assert measured == pytest.approx(speedup, rel=1e-9)
    assert clock.calls == {torch.float32: 3 + 3 * 3, torch.bfloat16: bf16_matmuls}  # 3 shapes: q/o, up, down


def test_the_header_says_which_precision_and_why(run_dir, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(smollm2.hardware, "cpu_bf16_speedup", lambda config, rows: 3.0)
    train(load_config("config/tiny.yaml", ["train.precision=auto"]), 1, None, "run")
    assert "bf16 autocast (auto: bf16 matmul 3x fp32 on this CPU)" in capsys.readouterr().out


def linear_output_dtypes(run) -> set[torch.dtype]:
    """The dtypes of the outputs of every nn.Linear that ran in training mode during `run()`."""
    seen = set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_bf16_training_tracks_fp32(run_dir):  # noqa: F811
    settings = ["train.eval_every=200", "train.predict_every=200", "train.save_every=200", "train.grad_accum=1"]

    def run(precision: str):
        return lambda: train(
            load_config("config/tiny.yaml", [*settings, f"train.precision={precision}"]), 200, None, precision
        )

    assert linear_output_dtypes(run("fp32")) == {torch.float32}
    assert linear_output_dtypes(run("bf16")) == {torch.bfloat16}  # the step's matmuls really ran in bf16
    fp32, bf16 = metrics(run_dir / "fp32"), metrics(run_dir / "bf16")
    assert fp32[-1]["val_loss"] < fp32[0]["loss"] - 1  # it learned something
    # Step 1 is the same weights on the same batch: only bf16 rounding sets the losses apart.
    assert 0 < abs(bf16[0]["loss"] - fp32[0]["loss"]) < 1e-3 * fp32[0]["loss"]
    # After 200 steps the two runs part by about 0.5% here (val loss 4.090 vs 4.112, the last 20 steps'
    # losses 0.45% apart): a bound of twice that.
    assert bf16[-1]["val_loss"] == pytest.approx(fp32[-1]["val_loss"], rel=0.01)
    assert sum(r["loss"] for r in bf16[-20:]) == pytest.approx(sum(r["loss"] for r in fp32[-20:]), rel=0.01)


def test_bf16_resume_is_bitwise_exact(run_dir):  # noqa: F811
    config = load_config("config/tiny.yaml", ["train.schedule_steps=12", "train.precision=bf16"])
    train(config, 12, None, "full")
    train(config, 6, None, "split")
    train(config, 6, "split/checkpoints/step_6.pt", "split")
    full, split = metrics(run_dir / "full"), metrics(run_dir / "split")
    assert [r["loss"] for r in split[6:]] == [r["loss"] for r in full[6:]]
    a = torch.load(run_dir / "full/checkpoints/step_12.pt", weights_only=True)
    b = torch.load(run_dir / "split/checkpoints/step_12.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(v.dtype == torch.float32 for v in a["model"].values())  # master weights stay fp32
    exp_avg = next(iter(a["optimizer"]["state"].values()))["exp_avg"]
    assert exp_avg.dtype == torch.float32  # and so does the optimizer's state


def test_a_resume_keeps_the_precision_auto_chose_and_never_measures_again(run_dir, capsys, monkeypatch):  # noqa: F811
    config = load_config("config/tiny.yaml", ["train.precision=auto", "train.schedule_steps=4"])
    monkeypatch.setattr(smollm2.hardware, "cpu_bf16_speedup", lambda config, rows: 3.0)
    train(config, 2, None, "run")
    assert torch.load(run_dir / "run/checkpoints/step_2.pt", weights_only=True)["precision"] == "bf16"

    def busy_machine(config, rows):
        raise AssertionError("a resume measures nothing: a busy moment must not switch its precision")

    monkeypatch.setattr(smollm2.hardware, "cpu_bf16_speedup", busy_machine)
    capsys.readouterr()
    train(config, 2, "run/checkpoints/step_2.pt", "run")
    out, err = capsys.readouterr()
    assert "bf16 autocast (auto: kept from the checkpoint)" in out and not err
    assert torch.load(run_dir / "run/checkpoints/step_4.pt", weights_only=True)["precision"] == "bf16"


def test_an_explicit_precision_on_a_resume_is_the_users_choice_said_in_one_line(run_dir, capsys):  # noqa: F811
    train(load_config("config/tiny.yaml", ["train.precision=bf16"]), 2, None, "run")
    capsys.readouterr()
    train(load_config("config/tiny.yaml", ["train.precision=fp32"]), 2, "run/checkpoints/step_2.pt", "run")
    out, err = capsys.readouterr()
    assert "| fp32 (chosen) |" in out
    assert err.strip() == (
        "warning: train.precision=fp32 on a resume of a bf16 run: it goes on in fp32, "
        "so its losses will not be bitwise those of the run continued in bf16"
    )
    assert torch.load(run_dir / "run/checkpoints/step_4.pt", weights_only=True)["precision"] == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resumes_at_several_steps_are_bitwise_while_another_process_loads_the_cpu(run_dir, precision, monkeypatch):  # noqa: F811
    """One run of 6 steps against a run stopped and resumed at steps 2, 3 and 5, each start with its
    validation and predictions at the split step (the uninterrupted run evaluates only at its end),
    while a busy process shares the CPU."""
    settings = [
        f"train.precision={precision}",
        *("model.hidden_size=128", "model.intermediate_size=256", "data.seq_len=64", "train.batch_size=8"),
        *("train.schedule_steps=6", "train.warmup_steps=2", "train.eval_every=100", "train.predict_every=1"),
        *("train.save_every=100", "train.keep_last=10", "train.predict_tokens=4"),
    ]
    config = load_config("config/tiny.yaml", settings)
    monkeypatch.setattr("smollm2.trainer.peak_flops", lambda device, dtype: None)  # MFU's 2048^3 matmuls: time only
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        train(config, 6, None, "full")
        for start, steps in ((0, 2), (2, 1), (3, 2), (5, 1)):
            train(config, steps, f"split/checkpoints/step_{start}.pt" if start else None, "split")
    finally:
        busy.kill()
        busy.wait()
    full, split = metrics(run_dir / "full"), metrics(run_dir / "split")
    assert [r["step"] for r in split] == list(range(1, 7))
    assert [r["loss"] for r in split] == [r["loss"] for r in full]
    a = torch.load(run_dir / "full/checkpoints/step_6.pt", weights_only=True)
    b = torch.load(run_dir / "split/checkpoints/step_6.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    text = [(run_dir / run / "logs/samples.md").read_text().splitlines() for run in ("full", "split")]
    full_samples, split_samples = ([line for line in lines if "loss" not in line] for lines in text)
    assert full_samples == split_samples  # only the headers differ: the split's also name a val loss
