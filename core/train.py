"""Training and evaluation on in-memory tensors, with per-epoch checkpoints and resume.

Determinism: the batch order and the augmentation of epoch ``e`` come from a generator
seeded with ``(seed, e)``, so a run resumed after epoch k replays exactly what an
uninterrupted run would have done (on the CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.progress import JobCanceled, JobError, Progress, ProgressFn, StopFn


@dataclass
class FitSettings:
    """What :func:`fit` needs; built from the job config's ``train`` or ``finetune`` part."""

    epochs: int
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    batch_size: int = 128
    seed: int = 0
    amp: bool = True
    augment: bool = False
    patience: int | None = None  # early stop after this many epochs without val improvement
    keep_best: bool = False  # restore the weights of the best validation epoch at the end
    # Distillation from ``fit(teacher=...)``: loss = (1 - alpha) CE + alpha T^2 KL (alpha 0: off).
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    best_val_accuracy: float | None = None
    stopped_early: bool = False


@dataclass
class StageWindow:
    """Maps a stage's own progress (0..1) into the job's overall fraction."""

    stage: str = "train"
    start: float = 0.0
    end: float = 1.0

    def at(self, inner: float) -> float:
        return self.start + (self.end - self.start) * min(max(inner, 0.0), 1.0)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise JobError(
            "the config asks for device 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def batches(
    data: TensorDataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data.tensors
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: nn.Module, data: TensorDataset, batch_size: int = 512, amp: bool = False) -> torch.Tensor:
    """Logits for every sample (float32, on the CPU), model in eval mode, mode restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        for xb, _ in batches(data, batch_size, shuffle=False):
            with _autocast(device, amp):
                outs.append(model(xb.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 512) -> float:
    """Fraction (0..1) of samples whose arg-max logit is the label."""
    n = len(data)
    if n == 0:
        return float("nan")
    logits = predict(model, data, batch_size)
    return float((logits.argmax(1) == data.tensors[1]).sum()) / n


def make_optimizer(params: Any, s: FitSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}; choose sgd, adam or adamw")


def make_scheduler(opt: torch.optim.Optimizer, s: FitSettings) -> torch.optim.lr_scheduler.LRScheduler:
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.epochs))
    if s.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)


def fingerprint(*parts: Any) -> str:
    """A stable hash of what a checkpoint was made for: a changed config never resumes."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, tag: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and was made for ``tag``; never unpickles objects."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("tag") != tag:
        return None
    return state


def distillation_loss(
    hard_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """``(1 - alpha) * hard_loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    Note: the KL is averaged over the batch (``batchmean``, the true KL per sample), and the
    ``T^2`` factor keeps the soft term's gradients at the scale of the hard term's as T
    grows (Hinton et al., 2015), so ``alpha`` means the same at any temperature.
    """
    if alpha == 0.0:
        return hard_loss
    t = float(temperature)
    soft = nn.functional.kl_div(
        torch.log_softmax(student_logits.float() / t, dim=-1),
        torch.log_softmax(teacher_logits.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard_loss + alpha * t * t * soft


def fit(
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    settings: FitSettings,
    *,
    device: torch.device,
    checkpoint: Path | None = None,
    tag: str = "",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    window: StageWindow | None = None,
    teacher: nn.Module | None = None,
) -> FitResult:
    """Train ``model`` in place; checkpoint each epoch to ``checkpoint`` and resume from it.

    With a ``teacher`` (kept frozen, in eval mode) and ``settings.distill_alpha`` > 0 the
    loss is :func:`distillation_loss` of the labels' loss and the teacher's logits.

    Raises :class:`JobError` when the loss stops being finite and :class:`JobCanceled` when
    ``should_stop()`` becomes true.
    """
    from core.data import augment_batch  # local: data pulls in sklearn/torchvision

    window = window or StageWindow()
    model.to(device)
    opt = make_optimizer(model.parameters(), settings)
    sched = make_scheduler(opt, settings)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    if not 0.0 <= settings.distill_alpha <= 1.0 or settings.distill_temperature <= 0:
        raise ValueError("distill_alpha must be in [0, 1] and distill_temperature > 0")
    distill = teacher is not None and settings.distill_alpha > 0.0
    if teacher is not None:
        teacher.to(device).eval()
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 0
    since_best = 0

    state = load_checkpoint(checkpoint, tag) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        result.history = list(state["history"])
        start_epoch = int(state["epoch"])
        result.resumed_from_epoch = start_epoch
        result.best_val_accuracy = state.get("best_val_accuracy")
        best_state = state.get("best_model")
        since_best = int(state.get("since_best", 0))

    steps = max(1, math.ceil(len(train) / settings.batch_size))
    total_steps = settings.epochs * steps
    for epoch in range(start_epoch, settings.epochs):
        if settings.patience is not None and since_best >= settings.patience:
            result.stopped_early = True
            break
        model.train()
        gen = _epoch_generator(settings.seed, epoch)
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for step, (xb, yb) in enumerate(batches(train, settings.batch_size, True, gen)):
            if should_stop is not None and should_stop():
                raise JobCanceled("canceled")
            if settings.augment and xb.dim() == 4:
                # A 4-pixel pad suits 32x32 images; scale it for smaller ones (8x8 digits: 1).
                xb = augment_batch(xb, gen, pad=max(1, xb.shape[-1] // 8))
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with _autocast(device, settings.amp):
                logits = model(xb).float()
                loss = loss_fn(logits, yb)
                if distill:
                    assert teacher is not None
                    with torch.no_grad():
                        soft_targets = teacher(xb).float()
                    loss = distillation_loss(
                        loss, logits, soft_targets, settings.distill_alpha, settings.distill_temperature
                    )
            if not torch.isfinite(loss):
                raise JobError(
                    f"training diverged at epoch {epoch + 1}, step {step + 1}: the loss is {loss.item()}; "
                    f"lower the learning rate (now {settings.lr:g}) or the weight decay "
                    f"(now {settings.weight_decay:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * yb.shape[0]
            seen += yb.shape[0]
            if progress is not None and (step % 10 == 0 or step == steps - 1):
                done = (epoch * steps + step + 1) / total_steps
                progress(
                    Progress(
                        window.stage,
                        window.at(done),
                        epoch=epoch + 1,
                        epochs=settings.epochs,
                        step=step + 1,
                        steps=steps,
                        loss=loss_sum / max(seen, 1),
                    )
                )
        sched.step()
        val_acc = accuracy(model, val)
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "val_accuracy": val_acc,
            "lr": float(opt.param_groups[0]["lr"]),
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(record)
        if result.best_val_accuracy is None or val_acc > result.best_val_accuracy:
            result.best_val_accuracy = val_acc
            since_best = 0
            if settings.keep_best:
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        if checkpoint is not None:
            ckpt: dict[str, Any] = {
                "tag": tag,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": result.history,
                "best_val_accuracy": result.best_val_accuracy,
                "since_best": since_best,
            }
            if best_state is not None:
                ckpt["best_model"] = best_state
            save_checkpoint(checkpoint, ckpt)
        if progress is not None:
            progress(
                Progress(
                    window.stage,
                    window.at((epoch + 1) / settings.epochs),
                    epoch=epoch + 1,
                    epochs=settings.epochs,
                    step=steps,
                    steps=steps,
                    loss=record["loss"],
                    val_accuracy=val_acc,
                    message=f"epoch {epoch + 1}/{settings.epochs} done",
                )
            )
    if settings.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    return result
