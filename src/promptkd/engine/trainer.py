"""The training engine: one loop for every method.

- Optimiser over the method's learner only (SGD or AdamW); the learning rate is a pure function of the position
  in training (constant warm-up, then cosine, per epoch as Dassl or per step), so resuming needs no scheduler state.
- Precision: fp32, bf16 autocast (no scaler), fp16 autocast with a GradScaler (GPU).
- Checkpoints every epoch, atomically: a resume file (learner, optimiser, scaler, method resume state, history) and
  the trainable tensors. A run killed at any moment and resumed replays the unfinished epoch exactly (data order and
  augmentation are functions of seed, epoch and index) and ends with the same prompts as an uninterrupted run.
- A NaN/inf loss stops the run with a message; the last epoch's checkpoint is kept untouched.
- Distributed: under torchrun the method is wrapped in DistributedDataParallel; rank 0 logs and writes. BatchNorm
  that trains uses the global batch's statistics (:class:`~promptkd.engine.distributed.GlobalBatchNorm`, gloo and
  nccl), so 2 processes normalise what 1 would; plain BatchNorm is put back after training.
- Model selection: the last epoch, or (``select: val``) the best epoch on the validation split — never the test
  split; whatever was selected on is recorded. ``average_last_epochs: K`` ends with the mean of the trainable
  tensors at the ends of the last K epochs (a float64 running sum kept in the resume file, so a resumed run ends
  with the same mean; every process keeps the same sum, as DDP keeps the same tensors).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from promptkd.backbones import autocast_for
from promptkd.checkpoints import atomic_write_text, file_sha256, read_with_digest, write_with_digest
from promptkd.config import to_dict
from promptkd.engine.config import TrainConfig, stable_dict
from promptkd.engine.data import make_loader, sample_seed, set_epoch
from promptkd.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    gather_concat,
    gather_lists,
    restore_batchnorm,
    use_global_batchnorm,
)
from promptkd.engine.stream import StreamSource, stream_batches
from promptkd.errors import PromptKDError
from promptkd.methods.base import Batch, Method

logger = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"
FINAL_NAME = "prompts"


class TrainingDivergedError(PromptKDError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResumeError(PromptKDError, RuntimeError):
    """A resume folder that belongs to another run (method, config or classes)."""


def _differences(old: Any, new: Any, where: str) -> list[str]:
    """The leaf keys where two JSON-like values differ, as 'a.b: old -> new' (lists compared whole, abridged)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line for k in sorted(set(old) | set(new)) for line in _differences(old.get(k), new.get(k), f"{where}.{k}")
        ]
    if json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str):
        return []

    def short(value: Any) -> str:
        if isinstance(value, list) and len(value) > 4:
            return f"[{', '.join(map(repr, value[:3]))}, ... ({len(value)} items)]"
        return json.dumps(value, default=str)

    return [f"{where}: {short(old)} -> {short(new)}"]


def _bound_to_content(value: Any) -> Any:
    """The value with every string that names an existing file replaced by that file's SHA-256 and every folder by
    its resolved path: a resumed run is the same run whichever spelling of a path it is given (relative, absolute,
    a link), and another file under the same name is a different run."""
    if isinstance(value, dict):
        return {k: _bound_to_content(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bound_to_content(v) for v in value]
    if isinstance(value, str) and value and "\0" not in value and len(value) < 4096:
        try:
            path = Path(value)
            if path.is_file():
                return f"sha256:{file_sha256(path)}"
            if path.is_dir():
                return str(path.resolve())
        except OSError:
            return value
    return value


def learning_rate(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """LR at 0-based ``epoch`` and ``step`` within it: constant (or linear) warm-up, then cosine to 0.

    Per epoch (Dassl): epochs < warmup use ``warmup_lr``; epoch e >= warmup uses lr·(1 + cos(π·e/E))/2.
    Per step: the same shape over global steps (warm-up ``warmup_steps``, else ``warmup_epochs`` epochs of steps).
    ``open_clip`` warm-up (per step): lr·(s+1)/W for s < W, then lr·(1 + cos(π·(s-W)/(T-W)))/2.
    """
    if cfg.schedule_per == "epoch":
        position, warmup, total = epoch, cfg.warmup_epochs, cfg.epochs
    else:
        position = epoch * steps_per_epoch + step
        warmup = cfg.warmup_steps or cfg.warmup_epochs * steps_per_epoch
        total = cfg.epochs * steps_per_epoch
    if cfg.warmup_type == "open_clip":
        if position < warmup:
            return cfg.lr * (position + 1) / warmup
        position, total = position - warmup, total - warmup
    elif cfg.warmup_type != "none" and position < warmup:
        if cfg.warmup_type == "constant":
            return cfg.warmup_lr
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * position / max(1, warmup)
    if cfg.scheduler == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * position / max(1, total)))


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """SGD or AdamW over a method's parameter groups (:meth:`Method.param_groups`)."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PromptKDError("the method has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@dataclass
class _ResumePoint:
    """Where a resumed run continues: ``epoch`` epochs done, ``step`` steps of the next (with its running loss and
    the generator state at that step), the history and the best epoch so far."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    running: tuple[float, int] = (0.0, 0)
    rng: torch.Tensor | None = None
    average: dict[str, Any] = field(default_factory=dict)  # {"count": epochs summed, "sum": float64 tensors}


@dataclass
class TrainResult:
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0


@torch.no_grad()
def predict_logits(
    method: Method,
    dataset,
    *,
    batch_size: int = 100,
    precision: str = "fp32",
    device: torch.device | None = None,
    info: DistInfo | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], labels [N]) over a dataset of (image, label, ...) with the eval transform applied."""
    info = info or DistInfo()
    device = device or next(method.clip.parameters()).device
    loader, _, _ = make_loader(
        dataset,
        batch_size=batch_size * info.world_size,
        seed=0,
        shuffle=False,
        rank=info.rank,
        world_size=info.world_size,
    )
    was_training = method.training
    method.eval()
    logits, labels, order = [], [], []
    for batch in tqdm(loader, desc="evaluating", leave=False, disable=not (progress and info.is_main)):
        batch = batch.to(device)
        with autocast_for(precision, device):
            out = method.logits(batch.images)
        logits.append(out.float().cpu())
        labels.append(batch.labels.cpu())
        order.append(batch.index.cpu())
    method.train(was_training)
    cat = (lambda xs: torch.cat(xs)) if logits else (lambda xs: torch.empty(0))
    all_logits, all_labels, all_index = cat(logits), cat(labels), cat(order)
    if info.enabled:
        all_logits = gather_concat(all_logits.to(device), info).cpu()
        all_labels = gather_concat(all_labels.to(device), info).cpu()
        all_index = gather_concat(all_index.to(device), info).cpu()
    sort = all_index.argsort()
    return all_logits[sort], all_labels[sort]


class Trainer:
    """Runs a method's training on a dataset of (image, label) pairs with the engine's guarantees."""

    def __init__(
        self,
        method: Method,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        device: torch.device | None = None,
        info: DistInfo | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        self.method = method
        self.cfg = cfg if cfg.seed is not None else dataclasses.replace(cfg, seed=1)  # a bare TrainConfig: seed 1
        self.out = Path(out_dir)
        self.info = info or DistInfo()
        self.device = device or torch.device("cpu")
        self.run_config = run_config or {}
        self.method.to(self.device)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    # --- resume ------------------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "method_config": _bound_to_content(to_dict(self.method.config)),
            "train": _bound_to_content(stable_dict(self.cfg)),
            "classnames": self.method.classnames,
            "backbone": {k: self.method.backbone.spec.to_dict()[k] for k in ("model_name", "pretrained", "quick_gelu")},
            **self._seed_identity(),
        }

    def _seed_identity(self) -> dict[str, Any]:
        """The split and init seeds when set apart from the run seed (absent otherwise: old resume files match)."""
        seeds = {k: self.run_config[k] for k in ("split_seed", "init_seed") if self.run_config.get(k) is not None}
        return {"seeds": seeds} if seeds else {}

    def _load_resume(self, optimizer: torch.optim.Optimizer, scaler) -> _ResumePoint:
        path = self.out / RESUME_FILE
        if not path.is_file():
            return _ResumePoint()
        payload = read_with_digest(path)  # a damaged file is refused, never loaded as other numbers
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ResumeError(f"{path}: cannot read the resume file ({error}); delete it to start over.") from error
        ours = self._identity()
        theirs = state.get("identity", {})
        diffs = [
            key
            for key in ours
            if json.dumps(ours[key], sort_keys=True, default=str)
            != json.dumps(theirs.get(key), sort_keys=True, default=str)
        ]
        if diffs:
            changes = [line for key in diffs for line in _differences(theirs.get(key), ours[key], key)]
            shown = "\n".join(f"  {line}" for line in changes[:12]) + (
                f"\n  ... and {len(changes) - 12} more" if len(changes) > 12 else ""
            )
            raise ResumeError(
                f"{self.out} holds an unfinished run with other settings (folder's value -> this run's):\n{shown}\n"
                "Use another --out folder, run with the folder's settings to resume it, or delete it to start over."
            )
        self.method.load_trainable(state["learner"], path)
        self.method.load_resume_state(state.get("method_state", {}))
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        point = _ResumePoint(
            int(state["epoch"]),
            int(state.get("step", 0)),
            list(state.get("history", [])),
            dict(state.get("best", {})),
            tuple(state.get("running", (0.0, 0))),  # type: ignore[arg-type]
            state.get("rng"),
            dict(state.get("average") or {}),
        )
        where = f"step {point.step} of epoch {point.epoch + 1}" if point.step else f"epoch {point.epoch}"
        logger.info("resuming %s after %s", self.out, where)
        return point

    def _save_resume(
        self,
        epoch: int,
        optimizer,
        scaler,
        history: list[dict],
        best: dict,
        *,
        step: int = 0,
        running: tuple[float, int] = (0.0, 0),
        average: dict[str, Any] | None = None,
    ) -> None:
        """Everything a resumed run needs; ``epoch`` epochs are complete and ``step`` steps of the next one."""
        if not self.info.is_main:
            return
        state = {
            "identity": self._identity(),
            "epoch": epoch,
            "step": step,
            "running": list(running),
            "rng": torch.random.get_rng_state() if step else None,
            "learner": {k: v.detach().cpu().clone() for k, v in self.method.trainable_state().items()},
            "method_state": {k: v.detach().cpu().clone() for k, v in self.method.resume_state().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": history,
            "best": best,
        }
        if average:
            state["average"] = average
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_with_digest(self.out / RESUME_FILE, buffer.getvalue())

    # --- the loop ----------------------------------------------------------------------------------------------------
    def fit(self, train_set, val_set=None) -> TrainResult:
        cfg, info, method = self.cfg, self.info, self.method
        _warn_slow_bf16(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        start_time = time.perf_counter()
        train_batches, val_batches = self._prepare_data(train_set, val_set)
        if not method.trains or cfg.epochs == 0:
            method.prepare(train_batches, val_batches)
            path = (
                method.save(self.out / FINAL_NAME, {"train": stable_dict(cfg), "selection": {"on": "none"}})
                if info.is_main
                else None
            )
            return TrainResult(0, [], {"on": "none"}, path)
        streamed = isinstance(train_set, StreamSource)
        if streamed:
            loader = seeded = sampler = None
            steps = len(train_set) // cfg.batch_size
        else:
            loader, seeded, sampler = make_loader(
                train_set,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                shuffle=True,
                rank=info.rank,
                world_size=info.world_size,
                num_workers=cfg.num_workers,
                drop_last=len(train_set) >= cfg.batch_size,
            )
            steps = len(loader)
        if steps == 0:
            raise PromptKDError(f"the training set has {len(train_set)} images: fewer than one batch per process")
        method.prepare(train_batches, val_batches)
        params = method.trainable_parameters()
        optimizer = build_optimizer(cfg, method.param_groups(cfg.weight_decay))
        use_scaler = cfg.precision == "fp16" and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        resume = self._load_resume(optimizer, scaler)
        start_epoch, history, best = resume.epoch, resume.history, resume.best
        stream = None
        if streamed:  # one continuous stream, from where the run stands
            stream = stream_batches(
                train_set,
                batch_size=cfg.batch_size,
                start=(start_epoch * steps + resume.step) * cfg.batch_size,
                rank=info.rank,
                world_size=info.world_size,
                num_workers=cfg.num_workers,
            )
        model: nn.Module = method
        swapped: list = []
        if info.enabled:  # BatchNorm that trains normalises the global batch, as 1 process would (any backend)
            swapped = use_global_batchnorm(method, method.learner)
            with warnings.catch_warnings():  # torch 2.14 deprecates broadcast_buffers; False is still what we mean
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                model = nn.parallel.DistributedDataParallel(
                    method,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    broadcast_buffers=False,  # BatchNorm statistics are global (GlobalBatchNorm): equal everywhere
                    find_unused_parameters=False,
                )
        metrics_path = self.out / "metrics.jsonl"
        writer = self._tensorboard()
        images_seen, compute_seconds = 0, 0.0
        epoch_bar = tqdm(
            range(start_epoch, cfg.epochs),
            desc=f"{method.name} epochs",
            initial=start_epoch,
            total=cfg.epochs,
            disable=not (cfg.progress and info.is_main),
        )
        for epoch in epoch_bar:
            method.train()
            first = resume.step if epoch == start_epoch else 0
            if stream is not None:
                batches = itertools.islice(stream, steps - first)
            else:
                set_epoch(seeded, sampler, epoch, skip_batches=first)
                batches = loader
            running, count = resume.running if first else (0.0, 0)
            if first and resume.rng is not None:
                torch.random.set_rng_state(resume.rng)  # in-method randomness continues where it stopped
            else:
                torch.manual_seed(sample_seed(cfg.seed, epoch, -2))  # any in-method randomness replays on resume
            step_bar = tqdm(
                batches,
                desc=f"epoch {epoch + 1}",
                leave=False,
                total=steps - first,
                disable=not (cfg.progress and info.is_main),
            )
            for step, batch in enumerate(step_bar, start=first):
                lr = learning_rate(cfg, epoch, step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = batch.to(self.device)
                tic = time.perf_counter()
                with autocast_for(cfg.precision, self.device):
                    output = model(batch)
                loss = output.loss
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingDivergedError(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}: training stopped. The last "
                        f"good checkpoint ({self.out / RESUME_FILE}, after epoch {epoch}) is unchanged. Lower the "
                        "learning rate, use fp32/bf16, or enable train.grad_clip."
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                compute_seconds += time.perf_counter() - tic
                images_seen += batch.images.shape[0] * info.world_size
                value = float(all_reduce_mean(loss.detach().float(), info))
                running += value
                count += 1
                global_step = epoch * steps + step + 1
                if info.is_main and (global_step % max(1, cfg.log_every) == 0 or step == steps - 1):
                    record = {
                        "epoch": epoch + 1,
                        "step": step + 1,
                        "global_step": global_step,
                        "lr": lr,
                        "loss": value,
                        **{k: float(v) for k, v in output.logs.items()},
                    }
                    self._append(metrics_path, record)
                    step_bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    if writer is not None:
                        for key, val in record.items():
                            if key not in ("epoch", "step", "global_step"):
                                writer.add_scalar(f"train/{key}", val, global_step)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                    self._save_resume(
                        epoch,
                        optimizer,
                        scaler,
                        history,
                        best,
                        step=step + 1,
                        running=(running, count),
                        average=resume.average,
                    )
            method.on_epoch_end(epoch + 1, cfg.epochs)
            entry: dict[str, Any] = {"epoch": epoch + 1, "loss": running / max(1, count), "lr": lr}
            if info.is_main:
                entry.update(method.epoch_metrics(epoch + 1, cfg.epochs))
            if val_set is not None and (cfg.select == "val" or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                logits, labels = predict_logits(method, val_set, precision=cfg.precision, device=self.device, info=info)
                entry["val_acc1"] = float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
                if cfg.select == "val" and (not best or entry["val_acc1"] > best["val_acc1"]):
                    best = {
                        "epoch": epoch + 1,
                        "val_acc1": entry["val_acc1"],
                        "learner": {k: v.detach().cpu().clone() for k, v in method.trainable_state().items()},
                    }
            history.append(entry)
            if info.is_main:
                measured = {k: v for k, v in entry.items() if k not in ("epoch", "loss", "lr")}
                logger.info(
                    "epoch %d/%d loss %.4f%s",
                    epoch + 1,
                    cfg.epochs,
                    entry["loss"],
                    "".join(f" {k} {v:.4g}" for k, v in list(measured.items())[:8]),
                )
                self._append(self.out / "epochs.jsonl", entry)
            self._accumulate_average(resume.average, epoch + 1)
            self._save_resume(epoch + 1, optimizer, scaler, history, best, average=resume.average)
            barrier(info)
        if streamed and info.enabled:  # each process skipped its own unreadable samples: the record lists them all
            train_set.skipped[:] = gather_lists(train_set.skipped, info)
        selection: dict[str, Any] = {"on": "last_epoch", "epoch": cfg.epochs}
        if cfg.select == "val" and best:
            method.load_trainable(best["learner"], "best validation epoch")
            selection = {"on": "val", "epoch": best["epoch"], "val_acc1": best["val_acc1"]}
        elif cfg.select == "val":
            selection = {"on": "last_epoch (no validation split)", "epoch": cfg.epochs}
        if cfg.average_last_epochs > 1:
            selection = self._load_average(resume.average)
        restore_batchnorm(swapped)
        method.on_train_end()  # after the selection, so end-of-training steps (GPA, Tip-Adapter-F search) see it
        path = None
        if info.is_main:
            path = method.save(
                self.out / FINAL_NAME, {"train": stable_dict(cfg), "selection": selection, "run": self.run_config}
            )
        if writer is not None:
            writer.close()
        barrier(info)
        seconds = time.perf_counter() - start_time
        return TrainResult(
            cfg.epochs - start_epoch,
            history,
            selection,
            path,
            seconds,
            images_seen / compute_seconds if compute_seconds else 0.0,
        )

    def _accumulate_average(self, average: dict[str, Any], epochs_done: int) -> None:
        """Add the trainable tensors at the end of epoch ``epochs_done`` to the running sum when it is one of the
        last ``average_last_epochs`` epochs (float64 sum: the mean does not depend on where a run was resumed)."""
        k = self.cfg.average_last_epochs
        if k < 2 or epochs_done <= self.cfg.epochs - k:
            return
        state = {key: v.detach().cpu() for key, v in self.method.trainable_state().items()}
        total = average.setdefault("sum", {})
        for key, value in state.items():
            if value.is_floating_point():
                total[key] = total[key] + value.double() if key in total else value.double().clone()
            else:  # integer state (a counter) is not averaged: the last value is kept
                total[key] = value.clone()
        average["count"] = int(average.get("count", 0)) + 1

    def _load_average(self, average: dict[str, Any]) -> dict[str, Any]:
        """Put the mean of the summed epoch ends into the method; returns the selection record."""
        count = int(average.get("count", 0))
        if count == 0:
            return {"on": "last_epoch", "epoch": self.cfg.epochs}
        current = self.method.trainable_state()
        mean = {
            key: (value / count).to(current[key].dtype) if value.is_floating_point() else value
            for key, value in average["sum"].items()
        }
        self.method.load_trainable(mean, f"mean of the last {count} epochs")
        first = self.cfg.epochs - count + 1
        return {"on": "average_last_epochs", "epochs": list(range(first, self.cfg.epochs + 1))}

    def _prepare_data(self, train_set, val_set):
        """Re-iterable data for ``Method.prepare``: every call of ``train_batches()`` is a new augmentation pass over
        the whole training set (not split across processes, no sample dropped); validation is never augmented."""
        cfg = self.cfg
        loader, seeded, sampler = make_loader(
            train_set, batch_size=cfg.batch_size, seed=cfg.seed + 1, shuffle=False, num_workers=cfg.num_workers
        )
        passes = iter(range(1 << 30))

        def train_batches():
            set_epoch(seeded, sampler, next(passes))
            return iter(loader)

        val_batches = None
        if val_set is not None:
            val_loader, _, _ = make_loader(
                val_set, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=False, num_workers=cfg.num_workers
            )

            def val_batches():
                return iter(val_loader)

        return train_batches, val_batches

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise PromptKDError("train.tensorboard needs the tensorboard package: pip install tensorboard") from error
        return SummaryWriter(str(self.out / "tensorboard"))


def _warn_slow_bf16(precision: str, device: torch.device) -> None:
    """bf16 autocast is ~2x faster than fp32 on CPUs with AVX512-BF16/AMX, but many times slower without (emulated)."""
    if precision == "bf16" and device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.startswith("AVX512"):
            logger.warning(
                "bf16 on this CPU (%s, no AVX-512) has no fast matrix kernels and is many times slower than fp32; "
                "use precision fp32",
                capability,
            )


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


__all__ = ["Batch", "TrainResult", "Trainer", "TrainingDivergedError", "learning_rate", "predict_logits"]
