"""The training loop: optimizer, schedule, precision, accumulation, eval, predictions, checkpoints."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from smollm2 import distributed
from smollm2.checkpoint import (
    capture_rng,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from smollm2.config import Config, ModelConfig, TrainConfig, UserError
from smollm2.data import BatchLoader, PreparedData, eval_batches, prepare
from smollm2.hf import save_pretrained
from smollm2.metrics import RunLog
from smollm2.model import Sampling, SmolLM2, parameter_count

MAX_BAD_STEPS = 3  # non-finite losses in a row before the run stops
PREDICTION_SAMPLING = Sampling(temperature=0.8, top_k=50, top_p=0.95)


# ---------------------------------------------------------------------------------------------
# Pieces of the loop


def learning_rate(step: int, t: TrainConfig, span: int) -> float:
    """Linear warmup, then cosine or warmup-stable-decay down to min_lr at `span`; min_lr after."""
    if step >= span:
        return t.min_lr
    if step <= t.warmup_steps:
        return t.lr * step / max(1, t.warmup_steps)
    if t.schedule == "wsd":
        decay_start = span - int(t.decay_fraction * span)
        if step <= decay_start:
            return t.lr
        progress = (step - decay_start) / max(1, span - decay_start)
        return t.lr + (t.min_lr - t.lr) * progress
    progress = (step - t.warmup_steps) / max(1, span - t.warmup_steps)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model: SmolLM2, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms or embeddings)."""
    embedding = model.embed_tokens.weight
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not embedding]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p is embedding]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel exists for CUDA and, in recent PyTorch, for CPU: one kernel for all parameters.
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the gradients (0 = no clipping), step, clear; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    return float(grad_norm)


def keep_freed_memory_on_cpu() -> bool:
    """Stop glibc from handing large freed blocks back to the OS after every step.

    By default each activation and gradient over 32 MB is a fresh mmap, so every training step on a
    CPU pays ~300,000 page faults to get its memory back (about a sixth of a SmolLM2-135M step here;
    BENCHMARKS.md). Keeping freed memory in the heap is what jemalloc/tcmalloc do for PyTorch.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    largest_int = 2**31 - 1  # mallopt takes a C int: ctypes silently wraps anything larger (2**34 -> 0)
    return all(
        mallopt(option, value)
        for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, largest_int), (m_top_pad, 1 << 28))
    )


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 makes bf16 matmul fast on a CPU; without it bf16 is ~100x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. auto: bf16 on CUDA that supports it, on CPU only with native bf16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores (PaLM appendix B)."""
    params = parameter_count(config)
    matmul_params = params if config.tie_embeddings else params - config.vocab_size * config.hidden_size
    return 6 * matmul_params + 12 * config.n_layers * config.hidden_size * seq_len


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's peak for the precision in use: a table for GPUs, a measurement for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if tflops is None:
            return None
        return tflops * 1e12 if dtype == torch.bfloat16 else tflops * 1e12 / 2  # tf32 runs at half rate
    return measure_cpu_matmul_flops()


def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class StopRequest:
    """SIGINT / SIGTERM: finish the current step, save, exit. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class RunState:
    step: int = 0
    tokens_seen: int = 0
    schedule_steps: int = 0
    bad_steps: int = 0
    last_loss: float | None = None
    last_val_loss: float | None = None


class Trainer:
    def __init__(self, config: Config, out_dir: str | Path, resume: dict | None, train_steps: int) -> None:
        self.config, self.out_dir = config, Path(out_dir)
        t = config.train
        self.world = distributed.setup()
        self.device = distributed.device_for(self.world)
        self.dtype = autocast_dtype(t.precision, self.device)
        if self.device.type == "cpu":
            keep_freed_memory_on_cpu()
        if self.dtype == torch.bfloat16 and self.device.type == "cpu" and t.precision == "bf16":
            if not cpu_has_native_bf16():
                print("warning: this CPU has no native bf16; bf16 will be ~100x slower than fp32", file=sys.stderr)
        torch.manual_seed(t.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
        # Rank 0 tokenizes; the others wait, then find its files ready and reuse them.
        if not self.world.is_main:
            distributed.barrier()
        self.data: PreparedData = prepare(config, self.out_dir, quiet=not self.world.is_main)
        if self.world.is_main:
            distributed.barrier()
        if resume is not None:
            check_compatible(resume, config, self.data)
        self.model = SmolLM2(config.model).to(self.device)
        self.model.gradient_checkpointing = t.grad_checkpointing
        if resume is not None:
            self.model.load_state_dict(resume["model"])  # whole weights, before any sharding
        torch.manual_seed(t.seed + self.world.rank)  # from here on each rank draws its own numbers
        # FSDP replaces the parameters with shards, so the optimizer is made after wrapping.
        self.train_model = distributed.wrap(self.model, self.world, t.parallel)
        self.optimizer = make_optimizer(self.model, t, self.device)
        self.loader = BatchLoader(
            self.data.train, t.batch_size, config.data.seq_len, t.seed, self.world.rank, self.world.size, self.device
        )
        self.val = eval_batches(self.data.val, t.batch_size, config.data.seq_len, t.eval_batches)
        self.state = RunState(schedule_steps=t.schedule_steps or train_steps)
        if resume is not None:
            distributed.load_optimizer_state(self.model, self.optimizer, resume["optimizer"])
            self.loader.load_state_dict(resume["loader"])
            restore_rng(resume["rng"])
            self.state = RunState(
                step=resume["step"],
                tokens_seen=resume["tokens_seen"],
                schedule_steps=t.schedule_steps or resume["schedule_steps"],
                last_loss=resume.get("last_loss"),
                last_val_loss=resume.get("last_val_loss"),
            )
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        self.tokens_per_step = t.batch_size * t.grad_accum * config.data.seq_len * self.world.size
        self.flops_per_step = flops_per_token(config.model, config.data.seq_len) * self.tokens_per_step
        self.peak = peak_flops(self.device, self.dtype) if self.world.is_main else None
        self.log = (
            RunLog(self.out_dir, self.state.step, config.to_dict(), t.wandb, t.wandb_project)
            if self.world.is_main
            else None
        )

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- one optimizer step ---------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        t = self.config.train
        self.train_model.train()
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            inputs, targets = next(self.loader)
            with distributed.no_sync(self.train_model, micro == t.grad_accum - 1), self.autocast():
                loss = self.train_model(inputs, targets) / t.grad_accum
                loss.backward()
            total += loss.detach()
        loss_value = distributed.mean_across_ranks(total.item(), self.device)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, float("nan")
        return loss_value, optimizer_step(self.model, self.optimizer, t.grad_clip)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.val:
            return None
        self.model.eval()
        losses = []
        for inputs, targets in self.val:
            with self.autocast():
                losses.append(self.model(inputs.to(self.device), targets.to(self.device)).item())
        return sum(losses) / len(losses)

    @torch.no_grad()
    def predict(self) -> list[tuple[str, str]]:
        """The config's prompts, sampled under a fixed seed: the same every time for the same weights."""
        tokenizer = self.data.tokenizer
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
        samples = []
        for prompt in self.config.train.prompts:
            ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
            room = self.config.model.max_seq_len - len(ids)
            with self.autocast():
                out = self.model.generate(
                    [ids],
                    min(self.config.train.predict_tokens, room),
                    sampling=PREDICTION_SAMPLING,
                    eos_id=tokenizer.eos_id,
                    generator=generator,
                )[0]
            samples.append((prompt, tokenizer.decode(out)))
        return samples

    # -- saving ---------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        model_state, optimizer_state = distributed.full_state_dicts(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "schedule_steps": self.state.schedule_steps,
            "last_loss": self.state.last_loss,
            "last_val_loss": self.state.last_val_loss,
            "rng": capture_rng(),
            "loader": self.loader.state_dict(),
            "config": self.config.to_dict(),
            "tokenizer_hash": self.data.tokenizer.hash,
            "tokenizer": self.data.tokenizer.backend.to_str(),
        }

    def save(self) -> Path:
        path = checkpoint_path(self.out_dir, self.state.step)
        state = self.checkpoint_state()  # every rank joins (FSDP gathers); only rank 0 writes
        self.saved_weights = state["model"]
        if self.world.is_main:
            save_checkpoint(state, path)
            prune_checkpoints(path.parent, self.config.train.keep_last)
        distributed.barrier()
        return path

    def export_final(self) -> tuple[Path, str]:
        final = self.out_dir / "final"
        staging = self.out_dir / "final.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model = self.model
        if distributed.is_sharded(model):  # the shards were gathered by the last save()
            model = SmolLM2(self.config.model)
            model.load_state_dict(self.saved_weights)
        kind = save_pretrained(model, staging, self.data.tokenizer)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        return final, kind

    # -- the loop -------------------------------------------------------------------------------

    def run(self, train_steps: int, resume_hint: str) -> None:
        t = self.config.train
        start, end = self.state.step, self.state.step + train_steps
        main = self.world.is_main
        if main:
            self.print_header(start, end)
        bar = tqdm(
            total=end, initial=start, desc="train", unit="step", disable=None if main else True, dynamic_ncols=True
        )
        began = time.perf_counter()
        stopped_early = False
        with StopRequest() as stop:
            while self.state.step < end:
                step = self.state.step + 1
                lr = learning_rate(step, t, self.state.schedule_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                tick = time.perf_counter()
                try:
                    loss, grad_norm = self.train_step()
                except torch.OutOfMemoryError:
                    raise UserError(
                        f"out of memory at step {step} with train.batch_size={t.batch_size} x "
                        f"data.seq_len={self.config.data.seq_len}: set train.grad_checkpointing=true or lower "
                        "train.batch_size (raise train.grad_accum to keep the global batch)"
                    ) from None
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - tick
                self.state.step = step
                self.state.tokens_seen += self.tokens_per_step
                self.handle_bad_loss(loss, step)
                if math.isfinite(loss):
                    self.state.last_loss = loss
                row = {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_sec": self.tokens_per_step / elapsed,
                    "tokens": self.state.tokens_seen,
                }
                if self.peak:
                    row["mfu"] = self.flops_per_step / elapsed / self.peak
                if step % t.eval_every == 0 or step == end:
                    self.state.last_val_loss = self.evaluate()
                    if self.state.last_val_loss is not None:
                        row["val_loss"] = self.state.last_val_loss
                        row["val_perplexity"] = math.exp(min(self.state.last_val_loss, 50))
                if main:
                    self.log.log(row)
                    bar.set_postfix(self.progress_fields(row), refresh=False)
                    bar.update(1)
                    if "val_loss" in row:
                        self.log.plot()
                        if bar.disable:  # no terminal (a pipe or a log file): one line per evaluation
                            print(
                                f"step {step}/{end} "
                                + " ".join(f"{k} {v}" for k, v in self.progress_fields(row).items())
                            )
                if step % t.predict_every == 0:
                    self.write_predictions(step, bar)
                if stop.requested and step < end:
                    stopped_early = True
                    break
                if step % t.save_every == 0 and step < end:
                    self.save()
        bar.close()
        path = self.save()
        if main:
            self.finish(path, start, time.perf_counter() - began, stopped_early, resume_hint, end)

    def handle_bad_loss(self, loss: float, step: int) -> None:
        if math.isfinite(loss):
            self.state.bad_steps = 0
            return
        self.state.bad_steps += 1
        print(f"\nwarning: step {step}: loss is {loss}; the update was skipped", file=sys.stderr)
        if self.state.bad_steps >= MAX_BAD_STEPS:
            path = self.save()
            raise UserError(
                f"the loss was not finite for {MAX_BAD_STEPS} steps in a row (to step {step}); the last good "
                f"weights are in {path}: lower train.lr or check the data"
            )

    def write_predictions(self, step: int, bar: tqdm) -> None:
        sharded = distributed.is_sharded(self.model)
        if not (self.world.is_main or sharded):
            return
        samples = self.predict()  # under FSDP every rank runs the forward passes; rank 0 writes
        if not self.world.is_main:
            return
        self.log.samples(step, self.state.last_loss, self.state.last_val_loss, samples)
        text = "\n".join(f"  {prompt!r} -> {continuation!r}" for prompt, continuation in samples)
        bar.write(f"step {step} predictions:\n{text}")

    def progress_fields(self, row: dict) -> dict:
        fields = {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_sec']:.0f}"}
        if "mfu" in row:
            fields["mfu"] = f"{100 * row['mfu']:.1f}%"
        if self.state.last_val_loss is not None:
            fields["val"] = f"{self.state.last_val_loss:.3f}"
        return fields

    def print_header(self, start: int, end: int) -> None:
        t = self.config.train
        params = self.model.num_parameters()
        precision = "bf16 autocast" if self.dtype == torch.bfloat16 else "fp32"
        print(
            f"model: {params:,} parameters | device: {self.device} x {self.world.size} | {precision} | "
            f"global batch {self.tokens_per_step:,} tokens ({t.batch_size} x {t.grad_accum} accum x "
            f"{self.config.data.seq_len} seq x {self.world.size} ranks)"
        )
        verb = "resuming at" if start else "training from"
        print(f"{verb} step {start}, to step {end}; lr schedule spans {self.state.schedule_steps} steps")

    def finish(self, path: Path, start: int, seconds: float, stopped_early: bool, resume_hint: str, end: int) -> None:
        self.log.plot()
        self.log.close()
        if stopped_early:
            print(f"stopped at step {self.state.step}; checkpoint: {path}")
            print(f"resume with: {resume_hint.format(steps=end - self.state.step, path=path)}")
            return
        final, kind = self.export_final()
        val = f"{self.state.last_val_loss:.4f}" if self.state.last_val_loss is not None else "n/a"
        print(
            f"done: steps {start} -> {self.state.step} in {seconds / 60:.1f} min, "
            f"{self.state.tokens_seen:,} tokens seen; final train loss {self.state.last_loss:.4f}, val loss {val}\n"
            f"  checkpoint: {path}\n"
            f"  model:      {final} ({'transformers Llama' if kind == 'llama' else 'safetensors + smollm2 config'})\n"
            f"  logs:       {self.log.metrics_path}, {self.log.samples_path}, {self.log.plot_path}"
        )


def check_compatible(resume: dict, config: Config, data: PreparedData) -> None:
    saved = resume["config"]["model"]
    current = config.to_dict()["model"]
    for key, value in current.items():
        if key == "attention":  # the kernel may change between machines; the weights do not
            continue
        if saved.get(key) != value:
            raise UserError(
                f"checkpoint has model.{key}={saved.get(key)!r} but {config.source} says {value!r}: "
                "it was trained with another architecture"
            )
    if resume["tokenizer_hash"] != data.tokenizer.hash:
        raise UserError(
            f"checkpoint was trained with tokenizer {resume['tokenizer_hash']}, but the data uses "
            f"{data.tokenizer.hash}: use the same data.tokenizer and data.path as the first run"
        )


def train(
    config: Config, train_steps: int, checkpoint: str | None, out_dir: str | Path = ".", resume_hint: str = ""
) -> None:
    """Train `train_steps` steps, from scratch or from `checkpoint`'s step onwards.

    resume_hint: the command that continues this run, with {steps} and {path} to fill in.
    """
    if train_steps <= 0:
        raise UserError(f"--train_steps must be a positive number of steps, got {train_steps}")
    resume = load_checkpoint(checkpoint) if checkpoint else None
    if not resume_hint:
        resume_hint = f"python train.py --config {config.source} --train_steps {{steps}} --checkpoint_path {{path}}"
    trainer = Trainer(config, out_dir, resume, train_steps)
    try:
        trainer.run(train_steps, resume_hint)
    finally:
        trainer.loader.close()
        distributed.teardown()
