"""The training loop and its parts.

`train()` checks everything that can be checked before a byte is written, takes the run folder's
lock, and runs a `Trainer`. The Trainer builds its components once (data, model, optimizer,
loader, validator, predictor, checkpointer, reporter); each owns its state and its cadence, so
`Trainer.run`, the loop itself, reads in one screen.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from smollm2 import chat_template, distributed, mixture, sft
from smollm2.checkpoint import (
    Checkpoint,
    Checkpointer,
    RunProgress,
    capture_rng,
    check_optimizer_state,
    load_weights,
    restore_rng,
)
from smollm2.config import Config, TrainConfig
from smollm2.data import PreparedData, prepared_digest, to_device
from smollm2.errors import UserError, error_reason
from smollm2.files import RunLock, missing_folders, remove_empty_folders, unmark_if_alone
from smollm2.generation import Sampling, check_fits, fit_new_tokens, generate, prompt_ids
from smollm2.hardware import (
    Precision,
    choose_precision,
    flops_per_token,
    keep_freed_memory_on_cpu,
    peak_flops,
)
from smollm2.metrics import Reporter, RunLog, Silent, SpeedModel, duration
from smollm2.mixture import MixtureData
from smollm2.model import SmolLM2
from smollm2.muon import ADJUST_LR, GatheringMuon, MuonWithAdamW, adamw_groups, hidden_matrices
from smollm2.pretrained import initial_weights, resolve_init_from
from smollm2.run_folder import RunFolder
from smollm2.tokenizer import Tokenizer

if TYPE_CHECKING:
    from smollm2.evaluation import TaskScores

MAX_BAD_STEPS = 3  # non-finite losses in a row before the run stops


# ---------------------------------------------------------------------------------------------
# Pieces of the loop


def learning_rate(step: int, settings: TrainConfig, span: int) -> float:
    """Linear warmup, then cosine or warmup-stable-decay down to min_lr at `span`; min_lr after."""
    if step >= span:
        return settings.min_lr
    if step <= settings.warmup_steps:
        return settings.lr * step / max(1, settings.warmup_steps)
    if settings.schedule == "wsd":
        decay_start = span - int(settings.decay_fraction * span)
        if step <= decay_start:
            return settings.lr
        progress = (step - decay_start) / max(1, span - decay_start)
        return settings.lr + (settings.min_lr - settings.lr) * progress
    progress = (step - settings.warmup_steps) / max(1, span - settings.warmup_steps)
    return settings.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (settings.lr - settings.min_lr)


def make_optimizer(
    model: SmolLM2, settings: TrainConfig, device: torch.device, matmul_dtype: torch.dtype | None = None
) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW (weight decay on matrices only, not on norms or embeddings); with train.optimizer=muon,
    Muon for the blocks' 2-D matrices and AdamW for the rest. Each group keeps `lr_ratio`, its base
    lr over train.lr, so the schedule scales every group's own learning rate. Muon's Newton-Schulz
    runs in the run's matmul precision (`matmul_dtype`, None = fp32): the one measured faster here."""
    matrices = [p for _, p in hidden_matrices(model)] if settings.optimizer == "muon" else []
    groups = [g | {"lr_ratio": 1.0} for g in adamw_groups(model, matrices, settings.weight_decay)]
    # The fused kernel exists for CUDA and, in recent PyTorch, for CPU: one kernel for all parameters.
    adamw = torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=1e-8, fused=True)
    if not matrices:
        return adamw
    muon_group = {"params": matrices, "lr_ratio": settings.muon_lr / settings.lr}
    muon = GatheringMuon(
        [muon_group],
        lr=settings.muon_lr,
        weight_decay=settings.muon_weight_decay,
        momentum=settings.muon_momentum,
        adjust_lr_fn=ADJUST_LR,
        ns_dtype=matmul_dtype or torch.float32,
    )
    return MuonWithAdamW(muon, adamw)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the gradients (0 = no clipping), step, clear; returns the norm before clipping.

    A non-finite norm (an overflow in backward, even with a finite loss) skips the update: one
    NaN gradient applied would make every weight NaN.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class DataPipeline(NamedTuple):
    """How a run's data is prepared, served and held out."""

    prepare: Callable  # (config, out_dir, quiet=False, workers=1) -> the prepared data
    loader: (
        Callable  # (data, config, rank, world_size, device) -> a Prefetcher (next, state_dict, load_state_dict, close)
    )
    # (data, config, batch_size) -> {name: (batches, weight)}; "" names a run's only set
    validation_sets: Callable


def data_pipeline(config: Config) -> DataPipeline:
    """The one place a run's data is picked: packed conversations for data.format chat, else token
    windows of text (one corpus, data.path, or a weighted mixture, data.sources)."""
    if config.data.format == "chat":
        return DataPipeline(sft.prepare, sft.make_loader, sft.validation_sets)
    if config.data.sources is not None:
        return DataPipeline(mixture.prepare_mixture, mixture.mixture_loader, mixture.validation_batches)
    return DataPipeline(mixture.prepare_corpus, mixture.corpus_loader, mixture.validation_batches)


def data_digest(data: PreparedData | MixtureData | sft.ChatData) -> str | None:
    """What a run trains and validates on, by content, for its checkpoints (`Checkpoint.check_data`):
    the token files of each prepared folder as their marker recorded them, or the packed conversations.
    The same text prepared again gives the same digest, wherever it lies; None where a source has
    none (a datatrove folder, a folder an older smollm2 marked)."""
    if isinstance(data, sft.ChatData):
        arrays = [a for rows in (data.train, data.val) for a in (rows.input_ids, rows.targets, rows.document_ids)]
        parts = [hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()]
    else:
        folders = [s.folder for s in data.sources] if isinstance(data, MixtureData) else [data.folder]
        parts = [prepared_digest(folder) for folder in folders]
    if None in parts:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class StopRequest:
    """SIGINT / SIGTERM: finish the current step, save, exit. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked (the process exits with 128 + it, after saving)
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Evaluation and predictions: each knows its cadence


def task_scores(settings: TrainConfig) -> TaskScores | None:
    """train.eval_tasks, their task files read and checked (code, templates, keys), or None."""
    if not settings.eval_tasks:
        return None
    from smollm2.evaluation import TaskScores  # lm-eval is a heavy import: only when asked for

    return TaskScores(settings)


class Validator:
    """The validation loss over the same first windows of the validation split, every eval_every steps;
    for a mixture, per source (`val_loss/NAME`) and their weighted mean (`val_loss`); and the figures
    of train.eval_tasks (smollm2.evaluation.TaskScores), when there are any."""

    def __init__(
        self, data: PreparedData | MixtureData, config: Config, batch_size: int, tasks: TaskScores | None
    ) -> None:
        """batch_size: the validation set's, kept by the run (`validation_batch_size`), not train.batch_size;
        tasks: train.eval_tasks, built (and refused) before the data was prepared (`task_scores`)."""
        self.every = config.train.eval_every
        self.sets = data_pipeline(config).validation_sets(data, config, batch_size)
        self.tokenizer, self.tasks = data.tokenizer, tasks

    def due(self, step: int, end: int) -> bool:
        return step % self.every == 0 or step == end

    def run(self, model: SmolLM2, autocast) -> dict:
        row = self.validation_loss(model, autocast)
        if self.tasks is not None:
            row |= self.tasks.run(model, self.tokenizer, autocast)
        return row

    @torch.no_grad()
    def validation_loss(self, model: SmolLM2, autocast) -> dict:
        losses = {name: self.loss(model, batches, autocast) for name, (batches, _) in self.sets.items() if batches}
        if not losses:
            return {}
        row = {f"val_loss/{name}": loss for name, loss in losses.items() if name}
        loss = losses[""] if "" in losses else self.mixture_loss(losses)
        return row | {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50))}

    def mixture_loss(self, losses: dict[str, float]) -> float:
        """The sources' losses weighted as the training windows are drawn."""
        weights = [self.sets[name][1] for name in losses]
        if not sum(weights):  # only zero-weight sources hold validation text: a plain mean
            weights = [1.0] * len(losses)
        return sum(w * loss for w, loss in zip(weights, losses.values(), strict=True)) / sum(weights)

    @staticmethod
    def loss(model: SmolLM2, batches: list, autocast) -> float:
        model.eval()
        device = model.embed_tokens.weight.device
        losses = []
        for batch in batches:
            with autocast():
                losses.append(model(**to_device(batch, device)).item())
        return sum(losses) / len(losses)


def prompt_tokens(config: Config, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt of train.prompts as the predictions feed it (for data.format chat, a user's message
    under the chat template); one that does not fit the model's context is refused in one line."""
    context = config.model.max_seq_len
    if config.data.format == "chat":
        ids = chat_template.prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        return check_fits(ids, context, f"train.prompts: {prompt[:40]!r} with the chat template")
    try:
        return prompt_ids(tokenizer, prompt, context)
    except UserError as error:
        raise UserError(f"{prompt[:40]!r}: {error.reason}", key="train.prompts") from None


def validation_batch_size(progress: RunProgress, resume: Checkpoint | None, settings: TrainConfig) -> int:
    """The validation set's batch size: train.batch_size at the run's first start, kept by its
    checkpoints, so a resume in another batch size measures val_loss on the same windows, in the same
    batches. A checkpoint older than that: the batch size its last session trained (and measured) with."""
    if progress.validation_batch_size is not None:
        return progress.validation_batch_size
    return int(resume.loader["batch_size"]) if resume is not None else settings.batch_size


class Predictor:
    """The config's prompts, sampled under a fixed seed every predict_every steps: the same text
    every time for the same weights, so the samples show what the model learned in between."""

    SAMPLING = Sampling(temperature=0.8, top_k=50, top_p=0.95)

    def __init__(self, config: Config, data: PreparedData) -> None:
        self.every, self.tokens, self.seed = config.train.predict_every, config.train.predict_tokens, config.train.seed
        self.tokenizer = data.tokenizer
        self.max_seq_len = config.model.max_seq_len
        self.chat = config.data.format == "chat"  # then a prompt is a user's message, the sample its reply
        self.stop_id = chat_template.end_of_turn_id(self.tokenizer) if self.chat else self.tokenizer.eos_id
        # Refused, if they do not fit, before the data is prepared (Trainer.accept_tokenizer).
        self.prompts = [(prompt, prompt_tokens(config, self.tokenizer, prompt)) for prompt in config.train.prompts]

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def run(self, model: SmolLM2, autocast) -> list[tuple[str, str]]:
        model.eval()
        generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(self.seed)
        samples = []
        for prompt, ids in self.prompts:
            budget = fit_new_tokens(ids, self.tokens, self.max_seq_len)
            with autocast():
                out = generate(model, [ids], budget, sampling=self.SAMPLING, eos_id=self.stop_id, generator=generator)[
                    0
                ]
            ended = self.chat and len(out) < budget
            # A reply shows its end-of-turn token when it produced one: the sign that the format is learnt.
            samples.append((prompt, self.tokenizer.decode(out) + (chat_template.END_OF_TURN if ended else "")))
        return samples


class DivergenceGuard:
    """Non-finite losses or gradients skip their update; MAX_BAD_STEPS in a row stop the run.

    While steps are bad no periodic checkpoint is written, and a checkpoint whose next step was bad
    is never shown good, so weights that went bad (even finite ones, after a huge update) never push
    the last good checkpoint out."""

    def __init__(self) -> None:
        self.in_a_row = 0

    @property
    def healthy(self) -> bool:
        """No bad step since the last good one: the last step's loss shows its weights were good."""
        return self.in_a_row == 0

    def check(self, step: int, loss: float, grad_norm: float, reporter) -> bool:
        """True when the run must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        reporter.warn(f"step {step}: {what}; the update was skipped")
        return self.in_a_row >= MAX_BAD_STEPS


# ---------------------------------------------------------------------------------------------
# The run


class Trainer:
    def __init__(
        self, config: Config, out_dir: str | Path, resume: Checkpoint | None, train_steps: int, world: distributed.World
    ) -> None:
        self.config, self.out_dir, settings = config, Path(out_dir), config.train
        self.world = world  # distributed.setup(), once, by train()
        self.device = distributed.device_for(self.world)
        self.precision = self.choose_precision(resume.progress.precision if resume else None)
        torch.manual_seed(settings.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
        self.progress = (
            resume.progress if resume else RunProgress(schedule_steps=settings.schedule_steps or train_steps)
        )
        if settings.schedule_steps:
            self.progress.schedule_steps = settings.schedule_steps
        self.progress.precision = self.precision.key
        self.progress.validation_batch_size = validation_batch_size(self.progress, resume, settings)
        self.model = SmolLM2(config.model).to(self.device)
        if resume is not None:
            load_weights(self.model, resume.model, "the checkpoint")  # whole weights, before any sharding
        elif config.model.init_from:
            self.model.load_state_dict(initial_weights(config.model.init_from))  # weights only: step 0
        torch.manual_seed(settings.seed + self.world.rank)  # from here on each rank draws its own numbers
        # FSDP replaces the parameters with shards, so the optimizer is made after parallelizing.
        self.train_model = distributed.parallelize(self.model, self.world, settings)
        self.optimizer = make_optimizer(self.model, settings, self.device, self.precision.dtype)
        if resume is not None:
            self.load_optimizer_state(resume.optimizer)
        tasks = task_scores(settings)
        # Weights, optimizer state and task files are read and refused above, before a data file is written.
        self.data = self.prepare_data(resume)
        self.data_digest = data_digest(self.data)
        if resume is not None and self.world.is_main:
            resume.check_data(self.data_digest, config)
        self.predictor = Predictor(config, self.data)
        self.loader = data_pipeline(config).loader(self.data, config, self.world.rank, self.world.size, self.device)
        if resume is not None:
            self.loader.load_state_dict(resume.loader)
            restore_rng(resume.rng)
        self.validator = Validator(self.data, config, self.progress.validation_batch_size, tasks)
        self.checkpointer = Checkpointer(self.out_dir, settings, self.world.is_main)
        self.checkpointer.claim(self.progress.run_id)
        self.guard = DivergenceGuard()
        self.tokens_per_step = settings.batch_size * settings.grad_accum * config.data.seq_len * self.world.size

    def choose_precision(self, kept: str | None) -> Precision:
        """A run's precision is decided at its start and kept by its checkpoints: a resume with
        train.precision=auto trains as the run did; another explicit choice is the user's, and said."""
        settings = self.config.train
        if self.device.type == "cpu":
            keep_freed_memory_on_cpu()
        if kept and settings.precision not in ("auto", kept) and self.world.is_main:
            print(
                f"warning: train.precision={settings.precision} on a resume of a {kept} run: it goes on in "
                f"{settings.precision}, so its losses will not be bitwise those of the run continued in {kept}",
                file=sys.stderr,
            )
        rows = settings.batch_size * self.config.data.seq_len
        return choose_precision(
            settings.precision, self.device, self.config.model, rows, agree=distributed.from_main_rank, kept=kept
        )

    def load_optimizer_state(self, state: dict) -> None:
        """The checkpoint's moments and step counts, under this config's hyperparameters: loading
        would otherwise bring back the weight decay and betas the run started with."""
        chosen = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        check_optimizer_state(self.optimizer, state, "the checkpoint")
        try:
            distributed.load_optimizer_state(self.model, self.optimizer, state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UserError(
                f"the checkpoint's optimizer state does not fit the model ({error_reason(exc, 120)})"
            ) from None
        for group, settings in zip(self.optimizer.param_groups, chosen, strict=True):
            group.update(settings)

    def prepare_data(self, resume: Checkpoint | None) -> PreparedData | MixtureData:
        """Rank 0 tokenizes; the others wait, then find its files ready and reuse them."""
        accept = functools.partial(self.accept_tokenizer, resume)
        with distributed.main_rank_first(self.world):
            return data_pipeline(self.config).prepare(
                self.config, self.out_dir, quiet=not self.world.is_main, accept_tokenizer=accept
            )

    def accept_tokenizer(self, resume: Checkpoint | None, tokenizer: Tokenizer) -> None:
        """Called as soon as the tokenizer is known (read, reused, or trained in memory from the
        corpus) and before any data file is written: a resume's tokenizer must be its checkpoint's,
        and every prompt must fit the context, or nothing is prepared."""
        if resume is not None:
            resume.check_tokenizer(tokenizer)
        for prompt in self.config.train.prompts:
            prompt_tokens(self.config, tokenizer, prompt)

    def autocast(self):
        if self.precision.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, train_steps: int, resume_hint: str) -> int | None:
        """Train to `end`; the signal number if SIGINT / SIGTERM stopped the run early (after saving)."""
        start, end = self.progress.step, self.progress.step + train_steps
        reporter = self.make_reporter(start, end)
        self.checkpointer.begin(start)
        with StopRequest() as stop:
            while self.progress.step < end:
                row = self.train_step()
                step = row["step"]
                if self.guard.check(step, row["loss"], row["grad_norm"], reporter):
                    self.stop_diverged(step, reporter)
                if self.guard.healthy:  # this step's loss came from the newest checkpoint's weights
                    self.checkpointer.confirm()
                if self.validator.due(step, end):
                    row |= self.validator.run(self.model, self.autocast)
                    self.progress.last_val_loss = row.get("val_loss", self.progress.last_val_loss)
                reporter.step(row)
                if self.predictor.due(step):
                    self.predict(step, reporter)
                if stop.requested and step < end:
                    break
                if self.checkpointer.due(step, end) and self.guard.healthy:
                    self.save()
        path = self.save()
        good = path is not None and self.guard.healthy and math.isfinite(row.get("val_loss", 0.0))
        if good and "val_loss" in row:  # no step follows the last checkpoint: its validation loss shows it good
            self.checkpointer.confirm()
        if not good and self.progress.step == end:
            self.refuse_final(path, reporter)
        stopped_early = self.progress.step < end
        self.finish(reporter, path, start, end, stopped_early=stopped_early, resume_hint=resume_hint)
        return stop.signum if stopped_early else None

    def train_step(self) -> dict:
        """One optimizer step (all its micro-batches); the metrics row of the step."""
        settings, step = self.config.train, self.progress.step + 1
        lr = learning_rate(step, settings, self.progress.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_ratio"]
        tick = time.perf_counter()
        try:
            loss, grad_norm = self.forward_backward_step()
        except torch.OutOfMemoryError:
            raise UserError(
                f"out of memory at step {step} with train.batch_size={settings.batch_size} x "
                f"data.seq_len={self.config.data.seq_len}: set train.grad_checkpointing=true or lower "
                "train.batch_size (raise train.grad_accum to keep the global batch)"
            ) from None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - tick
        self.progress.step = step
        self.progress.tokens_seen += self.tokens_per_step
        if math.isfinite(loss):
            self.progress.last_loss = loss
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": self.tokens_per_step / elapsed,
            "tokens": self.progress.tokens_seen,
        }
        return row

    def forward_backward_step(self) -> tuple[float, float]:
        """Accumulate the micro-batches' gradients, then step; a non-finite loss or norm skips the update."""
        settings = self.config.train
        self.train_model.train()
        total = torch.zeros((), device=self.device)
        for micro in range(settings.grad_accum):
            batch = next(self.loader)
            with distributed.no_sync(self.train_model, micro == settings.grad_accum - 1), self.autocast():
                loss = self.train_model(**batch) / settings.grad_accum
                loss.backward()
            total += loss.detach()
        loss_value = distributed.mean_across_ranks(total.item(), self.device)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, float("nan")
        return loss_value, optimizer_step(self.model, self.optimizer, settings.grad_clip)

    def predict(self, step: int, reporter) -> None:
        # Under FSDP every rank joins the forward passes; otherwise only rank 0 predicts.
        if self.world.is_main or distributed.is_sharded(self.model):
            if not self.weights_are_finite():  # sampling from them would fail: the run goes on to its end
                reporter.warn(f"step {step}: the weights are not finite; no predictions")
                return
            samples = self.predictor.run(self.model, self.autocast)
            reporter.predictions(step, self.progress.last_loss, self.progress.last_val_loss, samples)

    def weights_are_finite(self) -> bool:
        """On every rank under FSDP (each checks its shards), else on the calling rank alone."""
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]  # FSDP: DTensors
        local = all(bool(torch.isfinite(shard).all()) for shard in shards)
        if not distributed.is_sharded(self.model):
            return local
        return distributed.mean_across_ranks(float(local), self.device) == 1.0

    # -- saving ---------------------------------------------------------------------------------

    def snapshot(self) -> Checkpoint:
        """The whole training state (every rank joins: FSDP gathers the shards)."""
        model_state, optimizer_state = distributed.full_state_dicts(self.model, self.optimizer)
        return Checkpoint(
            progress=self.progress,
            model=model_state,
            optimizer=optimizer_state,
            loader=self.loader.state_dict(),
            rng=capture_rng(),
            config=self.config.to_dict(),
            tokenizer_hash=self.data.tokenizer.hash,
            tokenizer=self.data.tokenizer.backend.to_str(),
            chat_template=self.data.tokenizer.chat_template,
            data_digest=self.data_digest,
        )

    def save(self) -> Path | None:
        self.last_snapshot = self.snapshot()
        return self.checkpointer.save(self.last_snapshot)

    def stop_diverged(self, step: int, reporter) -> None:
        """Nothing is saved: the newest checkpoint stays the last good one, ready to resume from."""
        reporter.close()
        latest = self.checkpointer.last_good()
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written"
        raise UserError(
            f"the loss was not finite for {MAX_BAD_STEPS} steps in a row (to step {step}); {where}: "
            "lower train.lr or check the data"
        )

    def refuse_final(self, path: Path | None, reporter) -> None:
        """The last weights were not finite, or a loss from them was not: final/ is left as it was."""
        reporter.close()
        what = "are not finite" if path is None else f"gave a non-finite loss (kept as {path})"
        latest = self.checkpointer.last_good()
        where = f"the last good checkpoint is {latest}" if latest else "no good checkpoint was written"
        raise UserError(
            f"the weights at step {self.progress.step} {what}, so final/ was not written; {where}: "
            "lower train.lr or check the data"
        )

    # -- the end --------------------------------------------------------------------------------

    def make_reporter(self, start: int, end: int):
        if not self.world.is_main:
            return Silent()
        settings = self.config.train
        log = RunLog(self.out_dir, start, self.config.to_dict(), settings.wandb, settings.wandb_project)
        flops = flops_per_token(self.config.model, self.config.data.seq_len)
        speed = SpeedModel(self.device.type, self.tokens_per_step, flops, peak_flops(self.device, self.precision.dtype))
        reporter = Reporter(log, end, self.progress.last_val_loss, speed)
        reporter.header(self.header_lines(start, end))
        return reporter

    def header_lines(self, start: int, end: int) -> list[str]:
        settings = self.config.train
        params = self.model.num_parameters()
        verb = "resuming at" if start else "training from"
        return [
            f"model: {params:,} parameters | device: {self.device} x {self.world.size} | "
            f"{self.precision.name} ({self.precision.reason}) | {self.compile_note()} | "
            f"global batch {self.tokens_per_step:,} tokens ({settings.batch_size} x {settings.grad_accum} accum x "
            f"{self.config.data.seq_len} seq x {self.world.size} ranks)",
            f"{verb} step {start}, to step {end}; lr schedule spans {self.progress.schedule_steps} steps; "
            + self.optimizer_words(),
        ]

    def compile_note(self) -> str:
        compiled = distributed.compiles(self.config.train, self.device)
        how = "auto: " + ("CUDA" if compiled else "a CPU") if self.config.train.compile == "auto" else "train.compile"
        return f"{'torch.compile' if compiled else 'eager'} ({how})"

    def optimizer_words(self) -> str:
        settings = self.config.train
        if settings.optimizer == "muon":
            return f"Muon (lr {settings.muon_lr:g}) for the blocks' matrices, AdamW (lr {settings.lr:g}) for the rest"
        return f"AdamW (lr {settings.lr:g})"

    def finish(self, reporter, path: Path | None, start: int, end: int, stopped_early: bool, resume_hint: str) -> None:
        seconds = reporter.close()
        if not self.world.is_main:
            return
        summary = self.summary(start, seconds, stopped_early)
        reporter.summary(summary)
        if stopped_early:
            reporter.say(f"stopped at step {self.progress.step}; checkpoint: {path}")
            reporter.say(f"resume with: {resume_hint.format(steps=end - self.progress.step, path=path)}")
            return
        model = self.model
        if distributed.is_sharded(model):  # the shards were gathered by the last save()
            model = SmolLM2(self.config.model)
            model.load_state_dict(self.last_snapshot.model)
        final, kind = self.checkpointer.export_final(model, self.data.tokenizer)
        val = f"{summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else "n/a"
        log = reporter.log
        reporter.say(
            f"done: steps {start} -> {self.progress.step} in {duration(seconds)}, {summary['tokens']:,} tokens "
            f"({summary['epochs']:.2f} epochs of the training data) at {summary['tokens_per_sec']:,.0f} tokens/s; "
            f"final train loss {summary['final_loss']:.4f}, val loss {val}\n"
            f"  checkpoint: {path}\n"
            f"  model:      {final} ({'transformers Llama' if kind == 'llama' else 'safetensors + smollm2 config'})\n"
            f"  logs:       {log.metrics_path}, {log.samples_path}, {log.plot_path}, {log.summary_path}"
        )

    def summary(self, start: int, seconds: float, stopped_early: bool) -> dict:
        """The closing figures of this session of the run (a resume has its own)."""
        windows = self.loader.step * self.loader.batch_size * self.world.size
        tokens = (self.progress.step - start) * self.tokens_per_step
        return {
            "first_step": start,
            "last_step": self.progress.step,
            "stopped_early": stopped_early,
            "elapsed_seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_seen": self.progress.tokens_seen,
            "tokens_per_sec": tokens / max(seconds, 1e-9),
            "epochs": windows / self.loader.n_windows,
            "final_loss": self.progress.last_loss,
            "final_val_loss": self.progress.last_val_loss,
        }


def check_same_measurements(config: Config, resume: Checkpoint) -> None:
    """A resumed run measures what its run measured: a change that would put val_loss on other
    validation windows (train.eval_batches), or the eval tasks on another sample of their examples
    (train.eval_limit, while tasks run before and after), is refused in one line."""
    saved = resume.config.get("train", {})
    changes = [("eval_batches", "val_loss would be measured on other validation windows")]
    if saved.get("eval_tasks") and config.train.eval_tasks:
        changes.append(("eval_limit", "the eval tasks would be scored on another sample of their examples"))
    for key, what in changes:
        was, now = saved.get(key), getattr(config.train, key)
        if was is not None and was != now:
            raise UserError(
                f"checkpoint was measured with train.{key}={was!r} but {config.source} says {now!r}: {what}; "
                "keep it, or start a new run from the checkpoint's weights with model.init_from"
            )


def resume_command(config_path: str, overrides: list[str] = (), out_dir: str | Path = ".") -> str:
    """The command that continues a run, with {steps} and {path} left to fill in."""
    settings = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    folder = f" --out_dir {shlex.quote(str(out_dir))}" if str(out_dir) != "." else ""
    return (
        f"python train.py --config {shlex.quote(config_path)}{settings} --train_steps {{steps}} "
        f"--checkpoint_path {{path}}{folder}"
    )


def train(
    config: Config, train_steps: int, checkpoint: str | None, out_dir: str | Path = ".", resume_hint: str = ""
) -> int | None:
    """Train `train_steps` steps, from scratch or from `checkpoint`'s step onwards.

    Everything that can be refused is refused before anything is written: the steps, the
    checkpoint, the config against it, the run folder; then the folder is locked for this run, the
    weights (a resume's, model.init_from's) and a resume's optimizer state are read and checked, and
    the prompts and a resume's tokenizer are checked as soon as the tokenizer is known, before any
    data file is written (`Trainer.accept_tokenizer`).
    resume_hint: the command that continues this run, with {steps} and {path} to fill in.
    Returns the signal number when SIGINT / SIGTERM stopped the run (its checkpoint saved), else None.
    """
    if train_steps <= 0:
        raise UserError(f"--train_steps must be a positive number of steps, got {train_steps}")
    resume = Checkpoint.load(checkpoint) if checkpoint else None
    config = resolve_init_from(config, resume, checkpoint)
    if resume is not None:
        resume.check_resumable(config)
        check_same_measurements(config, resume)
    if config.train.eval_tasks:  # an unknown task is refused before anything is written
        from smollm2.evaluation import load_tasks

        load_tasks(config.train.eval_tasks, allow_code=config.train.eval_allow_code)
    resume_hint = resume_hint or resume_command(config.source, out_dir=out_dir)
    out_dir = Path(out_dir)
    checkpointer = Checkpointer(out_dir, config.train, is_main=True)
    checkpointer.check_folder(resume)  # before the lock, which creates the folder
    # What this run creates, it may remove again: only these, only if it made them, only if empty.
    run = RunFolder(out_dir)
    new_folders = missing_folders(run.data, run.checkpoints, run.logs, Path(config.data.prepared_dir or "."))
    world = distributed.setup()
    is_main = world.is_main
    marked, logs_before = False, None
    try:
        with RunLock(out_dir) if is_main else contextlib.nullcontext():
            checkpointer.check_folder(resume)  # again, now that no other run can change the folder
            logs_before = checkpointer.log_files()
            marked = is_main and checkpointer.mark_if_empty()
            trainer = Trainer(config, out_dir, resume, train_steps, world)
            try:
                stopped_by = trainer.run(train_steps, resume_hint)
            finally:
                trainer.loader.close()
    except BaseException:
        # A run that failed before writing anything (a data error, say) leaves no empty folders;
        # a fresh run that wrote no checkpoint leaves no logs (nothing to continue from them).
        if is_main:
            if resume is None and logs_before is not None:
                checkpointer.remove_new_logs(logs_before)
            remove_empty_folders(*new_folders)
            if marked and unmark_if_alone(out_dir):
                remove_empty_folders(*new_folders)
        raise
    finally:
        distributed.teardown()
    return stopped_by
