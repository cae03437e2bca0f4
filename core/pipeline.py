"""The whole job: build -> LoRITa train -> collapse -> compress -> fine-tune -> measure -> export.

Contract used by the CLI and the worker:

    report = run_job(config, out_dir, work_dir=..., progress=fn, should_stop=fn)

- ``out_dir`` receives the artifacts: model.safetensors, model.json, model.pt2, model.onnx,
  report.json, pareto.png and spectra.png (listed under the report's "plots"), and
  dense/ (the collapsed uncompressed model, which ``select`` starts from).
- ``work_dir`` holds the training checkpoint (``checkpoint.pt``, written atomically each
  epoch); when one is there, training resumes from it. Defaults to ``out_dir / "work"``.
- ``progress`` receives :class:`core.progress.Progress` reports.
- ``should_stop`` is polled between steps; when it returns True the run raises
  :class:`core.progress.JobCanceled`.
- A :class:`core.progress.JobError` or :class:`core.config.ConfigError` carries a message for
  a person. Returns the report dict (also written to ``out_dir / "report.json"``).

    report = select(job_dir, {"policy": "params_budget", "budget": 0.2}, new_dir)

picks another operating point from a finished job without training again (``lorita select``).
"""

from __future__ import annotations

import copy
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import svt
from core.config import ConfigError, FinetuneConfig, JobConfig, TrainConfig
from core.progress import JobError, Progress, ProgressFn, StopFn
from core.train import FitSettings, StageWindow, accuracy, fingerprint, fit, resolve_device

REPORT_FILE = "report.json"
DENSE_DIR = "dense"  # the collapsed, uncompressed model: what `lorita select` starts from
CHECKPOINT_FILE = "checkpoint.pt"

# Where each stage sits in the job's overall progress (0..1).
_WINDOWS = {
    "prepare": (0.0, 0.02),
    "train": (0.02, 0.80),
    "collapse": (0.80, 0.81),
    "compress": (0.81, 0.86),
    "finetune": (0.86, 0.93),
    "measure": (0.93, 0.96),
    "export": (0.96, 1.0),
}


def window(stage: str) -> StageWindow:
    start, end = _WINDOWS[stage]
    return StageWindow(stage, start, end)


class _Job:
    """Bookkeeping shared by the stages: progress, cancellation, timings."""

    def __init__(self, progress: ProgressFn | None, should_stop: StopFn | None) -> None:
        self.progress = progress
        self.should_stop = should_stop
        self.timings: dict[str, float] = {}

    def report(self, stage: str, inner: float = 0.0, message: str = "") -> None:
        if self.progress is not None:
            self.progress(Progress(stage, window(stage).at(inner), message=message))

    def check_stop(self) -> None:
        from core.progress import JobCanceled

        if self.should_stop is not None and self.should_stop():
            raise JobCanceled("canceled")

    @contextmanager
    def stage(self, name: str, message: str = "") -> Iterator[None]:
        self.check_stop()
        self.report(name, 0.0, message)
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)


def train_settings(cfg: TrainConfig, augment: bool) -> FitSettings:
    return FitSettings(
        epochs=cfg.epochs,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        step_size=cfg.step_size,
        gamma=cfg.gamma,
        label_smoothing=cfg.label_smoothing,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        amp=cfg.amp,
        augment=augment,
    )


def finetune_settings(ft: FinetuneConfig, train: TrainConfig | None, augment: bool) -> FitSettings:
    base = train or TrainConfig()
    return FitSettings(
        epochs=ft.epochs,
        optimizer=ft.optimizer or base.optimizer,
        lr=ft.lr if ft.lr is not None else base.lr / 10,
        momentum=base.momentum,
        weight_decay=ft.weight_decay,
        schedule="cosine",
        label_smoothing=base.label_smoothing,
        batch_size=base.batch_size,
        seed=base.seed + 1,
        amp=base.amp,
        augment=augment,
        patience=ft.patience,
        keep_best=True,
    )


def build(config: JobConfig, data: Any) -> nn.Module:
    """The model of ``config`` for ``data``, with its starting weights when given."""
    from core.export import WeightsError, load_weights_into
    from core.zoo import build_model

    num_classes = config.model.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise ConfigError(
            f"model.num_classes is {num_classes} but the dataset has {data.num_classes} classes; "
            "remove model.num_classes or raise it"
        )
    seed = config.train.seed if config.train else 0
    torch.manual_seed(seed)
    try:
        model = build_model(config.model.arch, num_classes, data.input_shape, config.model.options)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if config.model.weights:
        path = Path(config.model.weights)
        if not path.is_file():
            raise ConfigError(f"model.weights: {path} does not exist; give a .safetensors or .pt file")
        try:
            load_weights_into(model, path)
        except WeightsError as err:
            raise JobError(f"model.weights do not fit {config.model.arch}: {err}") from None
    return model


def choose_ranks(
    config: JobConfig,
    spectra: dict[str, svt.Spectrum],
    dense_params: int,
    dense_flops: int,
    evaluate: Callable[[svt.Ranks], float],
) -> tuple[svt.Ranks, list[dict[str, Any]]]:
    """The ranks the config's policy asks for, and every point evaluated on the way.

    Every policy goes through :func:`core.search.choose`, so every report has the dense
    reference and the chosen point on its Pareto curve (the budget policies add the points
    of their search).
    """
    from core import search

    other_params = dense_params - sum(sp.dense_params() for sp in spectra.values())
    other_flops = dense_flops - sum(sp.flops_at(sp.full_rank) for sp in spectra.values())
    return search.choose(config.compress, spectra, other_params, other_flops, evaluate)


def _versions() -> dict[str, str]:
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def run_job(
    config: JobConfig,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> dict[str, Any]:
    """Run the whole job of ``config``; write the artifacts into ``out_dir``; return the report."""
    from core.data import DataError, load_data
    from core.lorita import apply_lorita, cheaper_in_layer_space, collapse, find_targets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir is not None else out / "work"
    job = _Job(progress, should_stop)
    device = resolve_device(config.device)
    seed = config.train.seed if config.train else 0

    with job.stage("prepare", "loading data and building the model"):
        try:
            data = load_data(config.dataset, seed=seed)
        except DataError as err:
            raise JobError(f"dataset: {err}") from None
        model = build(config, data)
        num_classes = config.model.num_classes or data.num_classes

    training: dict[str, Any] = {"factors": config.train.factors if config.train else None}
    if config.train is not None:
        tcfg = config.train
        with job.stage("train", f"LoRITa training with N={tcfg.factors}"):
            targets = find_targets(model, tcfg.include, tcfg.exclude)
            layer_space = (
                cheaper_in_layer_space(model, targets, data.input_shape, tcfg.batch_size, tcfg.factors)
                if tcfg.composition == "auto" and tcfg.factors >= 2
                else []
            )
            composed = apply_lorita(
                model,
                tcfg.factors,
                tcfg.include,
                tcfg.exclude,
                init="weights" if config.model.weights else tcfg.init,
                seed=tcfg.seed,
                layer_space=layer_space,
            )
            tag = fingerprint(
                config.model.model_dump(),
                config.dataset.model_dump(),
                tcfg.model_dump(),
                num_classes,
            )
            result = fit(
                model,
                data.train,
                data.val,
                train_settings(tcfg, config.dataset.augment),
                device=device,
                checkpoint=work / CHECKPOINT_FILE,
                tag=tag,
                progress=progress,
                should_stop=should_stop,
                window=window("train"),
            )
            training.update(
                composed=[t.name for t in composed],
                layer_space=layer_space,
                skipped={t.name: t.reason for t in targets if not t.eligible},
                history=result.history,
                resumed_from_epoch=result.resumed_from_epoch,
            )
        with job.stage("collapse", "merging the factors"):
            try:
                collapse(model)
            except ValueError as err:
                raise JobError(str(err)) from None
    model.to(device).eval()

    return _compress_and_report(
        config, model, data, out, job, device, num_classes, training=training, finetune=True
    )


def _compress_and_report(
    config: JobConfig,
    model: nn.Module,
    data: Any,
    out: Path,
    job: _Job,
    device: torch.device,
    num_classes: int,
    *,
    training: dict[str, Any] | None,
    finetune: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compress the collapsed ``model``, fine-tune, measure, export, plot; write report.json.

    Shared by :func:`run_job` and :func:`select` (which starts from a saved dense model).
    """
    from core.export import ExportError, ModelMeta, export_all, save_model
    from core.metrics import count_flops, count_params, summarize

    model.to(device).eval()
    with job.stage("compress", "SVD of each layer and rank selection"):
        dense_params = count_params(model)
        dense_flops = count_flops(model, data.input_shape)
        spectra = svt.compute_spectra(model, data.input_shape)

        def evaluate(ranks: svt.Ranks) -> float:
            job.check_stop()
            return accuracy(svt.truncate(model, spectra, ranks), data.val)

        ranks, pareto = choose_ranks(config, spectra, dense_params, dense_flops, evaluate)
        compressed = svt.truncate(model, spectra, ranks)
        # Both were measured by the search (the dense reference is always its first point);
        # a validation pass is deterministic in eval mode, so it is not repeated here.
        dense_val = next(p["val_accuracy"] for p in pareto if p.get("stage") == "reference")
        compressed_val = next(p["val_accuracy"] for p in pareto if p["chosen"])

    finetune_info: dict[str, Any] | None = None
    if finetune and config.finetune.epochs > 0:
        with job.stage("finetune", "fine-tuning the compressed model"):
            tuned = copy.deepcopy(compressed)
            try:
                ft = fit(
                    tuned,
                    data.train,
                    data.val,
                    finetune_settings(config.finetune, config.train, config.dataset.augment),
                    device=device,
                    progress=job.progress,
                    should_stop=job.should_stop,
                    window=window("finetune"),
                )
            except JobError as err:  # a diverging fine-tune: keep the untuned model, say why
                finetune_info = {
                    "history": [],
                    "val_accuracy_before": compressed_val,
                    "val_accuracy_after": None,
                    "kept": False,
                    "error": str(err),
                }
            else:
                tuned_val = accuracy(tuned, data.val)
                kept = tuned_val >= compressed_val  # never return a model worse than the untuned one
                finetune_info = {
                    "history": ft.history,
                    "val_accuracy_before": compressed_val,
                    "val_accuracy_after": tuned_val,
                    "kept": kept,
                }
                if kept:
                    compressed, compressed_val = tuned, tuned_val

    with job.stage("measure", "accuracy, parameters, FLOPs, latency"):
        m = config.measure
        before = summarize(model, data.input_shape, m.batch_sizes, m.latency_repeats, m.threads, m.latency)
        after = summarize(
            compressed, data.input_shape, m.batch_sizes, m.latency_repeats, m.threads, m.latency
        )
        # the test split is evaluated once, here, after every choice was made on validation
        test_before = accuracy(model, data.test)
        test_after = accuracy(compressed, data.test)

    with job.stage("export", f"writing {', '.join(config.export)}"):
        table = svt.rank_table(spectra, ranks)
        meta = ModelMeta(
            arch=config.model.arch,
            num_classes=num_classes,
            input_shape=list(data.input_shape),
            options=dict(config.model.options),
            ranks=table,
        )
        example = data.test.tensors[0][:2]
        try:
            files = export_all(compressed, meta, out, list(config.export), example)
        except ExportError as err:
            raise JobError(str(err)) from None
        dense_meta = ModelMeta(
            config.model.arch, num_classes, list(data.input_shape), dict(config.model.options)
        )
        save_model(model.cpu(), dense_meta, out / DENSE_DIR)
        plots = write_plots(out, spectra, pareto, config)

    report = {
        "name": config.name,
        "config": config.model_dump(mode="json"),
        "dataset": {
            "name": data.name,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            "n_train": len(data.train),
            "n_val": len(data.val),
            "n_test": len(data.test),
        },
        "params": _before_after(before["params"], after["params"]),
        "flops": _before_after(before["flops"], after["flops"]),
        "accuracy": {
            "val": {"before": dense_val, "after": compressed_val},
            "test": {"before": test_before, "after": test_after},
        },
        "latency_ms": {
            b: {"before": before["latency_ms"][b], "after": after["latency_ms"][b]}
            for b in before.get("latency_ms", {})
        },
        "ranks": table,
        "pareto": pareto,
        "search": {"evaluations": len(pareto)},
        "training": training,
        "finetune": finetune_info,
        "files": files,
        "plots": plots,
        "timings": job.timings,
        "device": str(device),
        "versions": _versions(),
        **(extra or {}),
    }
    tmp = out / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / REPORT_FILE)
    if job.progress is not None:
        job.progress(Progress("done", 1.0, message="finished"))
    return report


def write_plots(
    out: Path, spectra: dict[str, svt.Spectrum], pareto: list[dict[str, Any]], config: JobConfig
) -> dict[str, dict[str, Any]]:
    """pareto.png and spectra.png next to report.json; ``{name: {"file", "bytes"}}``."""
    from core.plots import PARETO_FILE, SPECTRA_FILE, plot_pareto, plot_spectra

    title = f"{config.name or config.model.arch}: policy {config.compress.policy}"
    written = {
        "pareto": plot_pareto(pareto, out / PARETO_FILE, title=title),
        "spectra": plot_spectra(spectra, out / SPECTRA_FILE),
    }
    return {k: {"file": p.name, "bytes": p.stat().st_size} for k, p in written.items()}


def _before_after(before: int, after: int) -> dict[str, Any]:
    return {"before": before, "after": after, "ratio": after / before if before else None}


# ---------------------------------------------------------------------------------------
# lorita select: another operating point from a finished job, without training again
# ---------------------------------------------------------------------------------------


def read_job_report(job_dir: str | Path) -> dict[str, Any]:
    """The report.json of a finished job's output directory (ConfigError when unusable)."""
    path = Path(job_dir) / REPORT_FILE
    if not Path(job_dir).is_dir():
        raise ConfigError(f"{job_dir} is not a directory; give the --out directory of a finished job")
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{job_dir} has no {REPORT_FILE}; give the --out directory of a finished job"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(report, dict) or not isinstance(report.get("config"), dict):
        raise ConfigError(f"{path} holds no job config; it is not the report of a finished job")
    return report


def select_config(
    job_dir: str | Path, compress: dict[str, Any], *, finetune: bool = False, device: str | None = None
) -> tuple[JobConfig, dict[str, Any]]:
    """The job config ``select`` runs (the job's, with ``compress``) and the job's report.

    Raises ConfigError when ``job_dir`` is not a finished job or the policy is invalid.
    """
    from core.config import parse_config

    original = read_job_report(job_dir)
    raw = dict(original["config"])
    raw["compress"] = dict(compress)
    if not finetune:
        raw["finetune"] = {**dict(raw.get("finetune") or {}), "epochs": 0}
    if device is not None:
        raw["device"] = device
    return parse_config(raw), original


def select(
    job_dir: str | Path,
    compress: dict[str, Any],
    out_dir: str | Path,
    *,
    finetune: bool = False,
    device: str | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> dict[str, Any]:
    """Choose another operating point from the job in ``job_dir`` without training again.

    Starts from the collapsed dense model the job saved (``job_dir/dense``), reloads the
    job's data (same config and seed, so the same validation split), recomputes the spectra
    and runs ``compress`` (a policy as in the job config) with the same search. Writes a
    full set of artifacts and a report into ``out_dir``. Fine-tuning (the job's
    ``finetune`` settings) runs only when ``finetune`` is true; otherwise the new report's
    config says ``finetune.epochs = 0``. With the job's own policy (and fine-tuning as the
    job did) the ranks and figures are those of the job.
    """
    from core.data import DataError, load_data
    from core.export import ModelMetaError, WeightsError, load_model, read_meta

    source = Path(job_dir)
    config, original = select_config(source, compress, finetune=finetune, device=device)

    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise ConfigError("the output directory must differ from the job's directory")
    job = _Job(progress, should_stop)
    with job.stage("prepare", "loading the dense model and the data"):
        try:
            meta = read_meta(source / DENSE_DIR)
            model = load_model(source / DENSE_DIR)
        except (ModelMetaError, WeightsError) as err:
            raise ConfigError(
                f"cannot reload the job's dense model from {source / DENSE_DIR}: {err}"
            ) from None
        if meta.ranks:
            raise ConfigError(f"{source / DENSE_DIR} holds a compressed model; select needs the dense one")
        seed = config.train.seed if config.train else 0
        try:
            data = load_data(config.dataset, seed=seed)
        except DataError as err:
            raise JobError(f"dataset: {err}") from None
        if list(data.input_shape) != list(meta.input_shape):
            raise ConfigError(
                f"the data now has input shape {list(data.input_shape)} but the job's model takes "
                f"{meta.input_shape}; the dataset changed since the job ran"
            )
    out.mkdir(parents=True, exist_ok=True)
    return _compress_and_report(
        config,
        model,
        data,
        out,
        job,
        resolve_device(config.device),
        meta.num_classes,
        training=original.get("training"),
        finetune=finetune,
        extra={"selected_from": str(source)},
    )
