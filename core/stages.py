"""The stages of a job, each a function with typed inputs and outputs.

    prepare -> train -> collapse -> compress -> finetune -> measure -> export -> assemble

:func:`core.pipeline.run_job` runs them all; :func:`core.pipeline.select` starts at
``compress`` from a saved dense model. A :class:`StageRunner` times each stage, reports its
progress inside the stage's window (:class:`core.progress.Stage`) and polls cancellation.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core import svt
from core.config import ConfigError, FinetuneConfig, JobConfig, TrainConfig
from core.progress import JobCanceled, JobError, Progress, ProgressFn, Stage, StopFn
from core.report import (
    Accuracy,
    AccuracyChange,
    CountChange,
    DatasetInfo,
    EpochRecord,
    ExportFile,
    FinetuneInfo,
    JobReport,
    LatencyChange,
    LayerRank,
    PlotFile,
    SearchInfo,
    SearchPoint,
    TrainingInfo,
)
from core.speed_report import Int8Info, LatencySearch, Rounding, SpeedSummary
from core.train import FitSettings, StageWindow, accuracy, fingerprint, fit, resolve_device

if TYPE_CHECKING:
    from core.data import DataBundle
    from core.lorita import WeightTarget
    from core.search import SearchResult

DENSE_DIR = "dense"  # the collapsed, uncompressed model: what `lorita select` starts from
CHECKPOINT_FILE = "checkpoint.pt"


def window(stage: Stage) -> StageWindow:
    start, end = stage.window
    return StageWindow(stage, start, end)


@dataclass
class StageRunner:
    """Runs the stages of one job: progress inside each stage's window, cancellation, timings."""

    progress: ProgressFn | None = None
    should_stop: StopFn | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def report(self, stage: Stage, inner: float = 0.0, message: str = "") -> None:
        if self.progress is not None:
            self.progress(Progress(stage, window(stage).at(inner), message=message))

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobCanceled("canceled")

    @contextmanager
    def stage(self, stage: Stage, message: str = "") -> Iterator[None]:
        self.check_stop()
        self.report(stage, 0.0, message)
        t0 = time.perf_counter()
        yield
        self.timings[stage.value] = round(self.timings.get(stage.value, 0.0) + time.perf_counter() - t0, 4)

    def done(self) -> None:
        if self.progress is not None:
            self.progress(Progress(Stage.DONE, 1.0, message="finished"))


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


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


def default_finetune_lr(train: TrainConfig | None) -> float:
    """Fine-tuning's lr when ``finetune.lr`` is unset: the training lr, rewound (as in lr rewinding).

    A tenth of it (the old default) leaves an aggressively truncated model far from recovered: on
    real MNIST at 7% of the parameters, 5 epochs at the training lr reach 75-78% test against 62%
    (benchmarks/results/vs_pruning.md); keep-the-better on validation guards the mild budgets.
    Compressing given weights (no training config): a tenth of the default training lr (1e-3).
    """
    return train.lr if train is not None else TrainConfig().lr / 10


def finetune_settings(ft: FinetuneConfig, train: TrainConfig | None, augment: bool) -> FitSettings:
    base = train or TrainConfig()
    return FitSettings(
        epochs=ft.epochs,
        optimizer=ft.optimizer or base.optimizer,
        lr=ft.lr if ft.lr is not None else default_finetune_lr(train),
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
        distill_alpha=ft.distill.alpha if ft.distill is not None else 0.0,
        distill_temperature=ft.distill.temperature if ft.distill is not None else 4.0,
    )


def layer_space(
    model: nn.Module, targets: list[WeightTarget], input_shape: tuple[int, ...], cfg: TrainConfig
) -> list[str]:
    """Modules LoRITa composes as a chain of layers: with ``composition: auto`` those where a chain
    is cheaper (:func:`core.lorita.cheaper_in_layer_space`); none otherwise. Training and the
    plan both ask here."""
    from core.lorita import cheaper_in_layer_space
    from core.program.job import is_program

    if cfg.composition != "auto" or cfg.factors < 2 or is_program(model):
        return []  # a program's weights are composed in weight space only
    return cheaper_in_layer_space(model, targets, input_shape, cfg.batch_size, cfg.factors)


# ---------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------


def build(config: JobConfig, data: DataBundle) -> nn.Module:
    """The model of ``config`` for ``data``, with its starting weights when given."""
    from core.export import WeightsError, load_weights_into
    from core.zoo import build_model

    if config.model.program is not None:  # validated as data, loaded in a child process first
        from core.program.job import build_for_job

        return build_for_job(config, data)
    assert config.model.arch is not None  # exactly one of arch and program (ModelConfig)
    num_classes = config.model.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise ConfigError(
            f"model.num_classes is {num_classes} but the dataset has {data.num_classes} classes; "
            "remove model.num_classes or raise it"
        )
    torch.manual_seed(config.seed)
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


@dataclass
class Prepared:
    model: nn.Module  # dense, as built (trained in place by `train`)
    data: DataBundle
    num_classes: int
    device: torch.device


def prepare(config: JobConfig, runner: StageRunner) -> Prepared:
    from core.data import load_job_data

    with runner.stage(Stage.PREPARE, "loading data and building the model"):
        device = resolve_device(config.device)
        data = load_job_data(config)
        model = build(config, data)
    from core.program.job import classes_of

    return Prepared(model, data, classes_of(model) or config.model.num_classes or data.num_classes, device)


# ---------------------------------------------------------------------------------------
# train, collapse
# ---------------------------------------------------------------------------------------


def train(
    config: JobConfig, tcfg: TrainConfig, prepared: Prepared, runner: StageRunner, work: Path
) -> TrainingInfo:
    """LoRITa training of ``prepared.model`` in place (resuming from ``work``'s checkpoint)."""
    from core.program.job import compose, norm_mode_of, targets_of

    model, data = prepared.model, prepared.data
    with runner.stage(Stage.TRAIN, f"LoRITa training with N={tcfg.factors}"):
        given = given_accuracy(config, model, data, prepared.device)
        targets = targets_of(model, tcfg.include, tcfg.exclude)
        chains = layer_space(model, targets, data.input_shape, tcfg)
        composed = compose(
            model,
            tcfg.factors,
            tcfg.include,
            tcfg.exclude,
            init="weights" if config.model.weights else tcfg.init,
            seed=tcfg.seed,
            layer_space=chains,
            from_scratch=config.model.from_scratch,
        )
        tag = checkpoint_tag(config, tcfg, data, prepared.num_classes)
        result = fit(
            model,
            data.train,
            data.val,
            train_settings(tcfg, config.dataset.augment),
            device=prepared.device,
            checkpoint=work / CHECKPOINT_FILE,
            tag=tag,
            progress=runner.progress,
            should_stop=runner.should_stop,
            window=window(Stage.TRAIN),
        )
    return TrainingInfo(
        factors=tcfg.factors,
        composed=[t.name for t in composed],
        layer_space=chains,
        skipped={t.name: t.reason for t in targets if not t.eligible},
        history=[EpochRecord.model_validate(r) for r in result.history],
        resumed_from_epoch=result.resumed_from_epoch,
        norm_mode=norm_mode_of(model),
        given_val_accuracy=given[0] if given else None,
        given_test_accuracy=given[1] if given else None,
    )


def given_accuracy(
    config: JobConfig, model: nn.Module, data: DataBundle, device: torch.device
) -> tuple[float, float] | None:
    """(val, test) accuracy of the model as the user gave it, before LoRITa trains it; None when
    the job trains from scratch. The test figure is reported, never used for a choice."""
    if not (config.model.weights or (config.model.program is not None and not config.model.from_scratch)):
        return None
    first = next(model.parameters(), None)
    home = first.device if first is not None else device
    model.to(device)  # evaluated where it will train; composed where it was built, as before
    try:
        return accuracy(model, data.val), accuracy(model, data.test)
    finally:
        model.to(home)


# A drop in validation accuracy from the model as given to the trained dense model past which the
# report warns: every budget is measured from the trained model, so this loss is not in them
GIVEN_DROP_WARNING = 0.01


def result_warnings(config: JobConfig, training: TrainingInfo | None, dense_val: float | None) -> list[str]:
    """What a user must know before using the result (see ``JobReport.warnings``)."""
    warnings = []
    given = training.given_val_accuracy if training is not None else None
    if given is not None and dense_val is not None and given - dense_val > GIVEN_DROP_WARNING:
        lr = config.train.lr if config.train is not None else None
        lower = f"a lower train.lr than {lr:g} (e.g. {lr / 10:g})" if lr else "a lower train.lr"
        warnings.append(
            f"LoRITa training took your model from {100 * given:.2f}% to {100 * dense_val:.2f}% "
            f"validation accuracy ({100 * (dense_val - given):+.2f} points) before any compression, "
            "and every budget is measured from the trained model; to keep more of your model's "
            f"accuracy, train with {lower} or for more epochs"
        )
    return warnings


def checkpoint_tag(config: JobConfig, tcfg: TrainConfig, data: DataBundle, num_classes: int) -> str:
    """What a training checkpoint was made for; a checkpoint with another tag is never resumed.

    The config without where its files lie (a worker on another machine resolves the same
    uploads to other local paths, and must still resume) plus what those files held: the
    weights file's sha256 and a digest of the training and validation tensors.
    """
    import hashlib

    data_hash = hashlib.sha256()
    for split in (data.train, data.val):
        for t in split.tensors:
            data_hash.update(t.detach().cpu().contiguous().numpy().data)
    weights = None
    source = config.model.weights or config.model.program  # the file training starts from
    if source:
        weights_hash = hashlib.sha256()
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                weights_hash.update(chunk)
        weights = weights_hash.hexdigest()
    return fingerprint(
        config.model.model_dump(exclude={"weights", "program"}),
        config.dataset.model_dump(exclude={"path", "root", "download", "id"}),
        tcfg.model_dump(),
        num_classes,
        weights,
        data_hash.hexdigest(),
    )


def collapse(model: nn.Module, runner: StageRunner) -> None:
    from core.lorita import collapse as collapse_factors

    with runner.stage(Stage.COLLAPSE, "merging the factors"):
        try:
            collapse_factors(model)
        except ValueError as err:
            raise JobError(str(err)) from None


# ---------------------------------------------------------------------------------------
# compress
# ---------------------------------------------------------------------------------------


@dataclass
class Compression:
    spectra: dict[str, svt.Spectrum]
    search: SearchResult
    model: nn.Module  # the truncated model at the chosen ranks
    latency: dict[str, Any] | None = None  # latency_budget: predicted and measured (core.deploy)
    rounding: dict[str, Any] | None = None  # compress.round_to as applied

    @property
    def ranks(self) -> svt.Ranks:
        return self.search.ranks

    @property
    def dense_val(self) -> float:
        """Validation accuracy of the dense model, measured by the search (its first point)."""
        return self.search.reference.val_accuracy

    @property
    def val(self) -> float:
        return self.search.chosen.val_accuracy


def compress(config: JobConfig, model: nn.Module, data: DataBundle, runner: StageRunner) -> Compression:
    """SVD of each eligible layer and the ranks the policy asks for (see :mod:`core.search`)."""
    from core import search
    from core.deploy import choose_ranks
    from core.metrics import count_flops, count_params

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    from core.program.job import spectra_of
    from core.program.job import truncate as truncate_model  # zoo models and programs

    with runner.stage(Stage.COMPRESS, "SVD of each layer and rank selection"):
        spectra = spectra_of(model, data.input_shape)
        other_params = count_params(model) - sum(sp.dense_params() for sp in spectra.values())
        other_flops = count_flops(model, data.input_shape) - sum(
            sp.flops_at(sp.full_rank) for sp in spectra.values()
        )

        def evaluate(ranks: svt.Ranks) -> float:
            runner.check_stop()
            return accuracy(truncate_model(model, spectra, ranks), data.val)

        try:
            choice = choose_ranks(
                config, model, spectra, data.input_shape, evaluate, other_params, other_flops, device
            )
        except search.SearchError as err:
            raise ConfigError(f"compress: {err}") from None
        result = choice.result
        # Both validation accuracies were measured by the search; a validation pass is
        # deterministic in eval mode, so neither is repeated.
        return Compression(
            spectra, result, truncate_model(model, spectra, result.ranks), choice.latency, choice.rounding
        )


# ---------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------


@dataclass
class Finetuned:
    model: nn.Module  # the better (on validation) of the tuned and the untuned model
    val: float
    info: FinetuneInfo | None  # None when no fine-tuning ran


def finetune(
    config: JobConfig,
    compression: Compression,
    data: DataBundle,
    device: torch.device,
    runner: StageRunner,
    teacher: nn.Module | None = None,
) -> Finetuned:
    """Fine-tune the compressed model; never return one worse on validation than the untuned one.

    With ``finetune.distill`` the dense ``teacher``'s soft outputs join the labels.
    """
    untuned = Finetuned(compression.model, compression.val, None)
    if config.finetune.epochs <= 0:
        return untuned
    with runner.stage(Stage.FINETUNE, "fine-tuning the compressed model"):
        tuned = copy.deepcopy(compression.model)
        try:
            ft = fit(
                tuned,
                data.train,
                data.val,
                finetune_settings(config.finetune, config.train, config.dataset.augment),
                device=device,
                progress=runner.progress,
                should_stop=runner.should_stop,
                window=window(Stage.FINETUNE),
                teacher=teacher if config.finetune.distill is not None else None,
            )
        except JobError as err:  # a diverging fine-tune: keep the untuned model, say why
            untuned.info = FinetuneInfo(
                val_accuracy_before=compression.val, val_accuracy_after=None, kept=False, error=str(err)
            )
            return untuned
        tuned_val = accuracy(tuned, data.val)
        kept = tuned_val >= compression.val
        info = FinetuneInfo(
            history=[EpochRecord.model_validate(r) for r in ft.history],
            val_accuracy_before=compression.val,
            val_accuracy_after=tuned_val,
            kept=kept,
        )
        if kept:
            return Finetuned(tuned, tuned_val, info)
        untuned.info = info
        return untuned


# ---------------------------------------------------------------------------------------
# measure
# ---------------------------------------------------------------------------------------


@dataclass
class Measurements:
    params: CountChange
    flops: CountChange
    latency_ms: dict[str, LatencyChange]  # every configured batch size (empty: latency off)
    test_before: float
    test_after: float


def measure(
    config: JobConfig, dense: nn.Module, compressed: nn.Module, data: DataBundle, runner: StageRunner
) -> Measurements:
    from core.metrics import summarize

    m = config.measure
    with runner.stage(Stage.MEASURE, "accuracy, parameters, FLOPs, latency"):
        before = summarize(dense, data.input_shape, m.batch_sizes, m.latency_repeats, m.threads, m.latency)
        after = summarize(
            compressed, data.input_shape, m.batch_sizes, m.latency_repeats, m.threads, m.latency
        )
        # the test split is evaluated once, here, after every choice was made on validation
        test_before = accuracy(dense, data.test)
        test_after = accuracy(compressed, data.test)
    latency = {
        b: LatencyChange.of(ms, after["latency_ms"][b]) for b, ms in before.get("latency_ms", {}).items()
    }
    return Measurements(
        params=CountChange.of(before["params"], after["params"]),
        flops=CountChange.of(before["flops"], after["flops"]),
        latency_ms=latency,
        test_before=test_before,
        test_after=test_after,
    )


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------


@dataclass
class Exports:
    files: dict[str, ExportFile]
    plots: dict[str, PlotFile]
    size_bytes: CountChange | None  # model.safetensors: dense vs compressed


def export(
    config: JobConfig,
    dense: nn.Module,
    compressed: nn.Module,
    compression: Compression,
    data: DataBundle,
    num_classes: int,
    out: Path,
    runner: StageRunner,
) -> Exports:
    """The compressed model in every requested format (parity-checked), the dense model, the plots."""
    from core.export import WEIGHTS_FILE, ExportError, ModelMeta, export_all, save_model
    from core.program.graph import ProgramModel
    from core.program.job import export_for_job

    with runner.stage(Stage.EXPORT, f"writing {', '.join(config.export)}"):
        if isinstance(compressed, ProgramModel) and isinstance(dense, ProgramModel):
            example = data.test.tensors[0][:2]
            files = export_for_job(
                config, dense, compressed, compression.spectra, compression.ranks, example, out, DENSE_DIR
            )
            plots = write_plots(out, compression, config)
            sizes = CountChange.of(
                (out / DENSE_DIR / WEIGHTS_FILE).stat().st_size, (out / WEIGHTS_FILE).stat().st_size
            )
            return Exports({k: ExportFile.model_validate(v) for k, v in files.items()}, plots, sizes)
        meta = ModelMeta(
            arch=config.model.label,
            num_classes=num_classes,
            input_shape=list(data.input_shape),
            options=dict(config.model.options),
            ranks=svt.rank_table(compression.spectra, compression.ranks),
        )
        example = data.test.tensors[0][:2]
        # onnx_int8 quantizes model.onnx afterwards (core.deploy), so it needs the FP32 export
        formats: list[str] = [f for f in config.export if f != "onnx_int8"]
        if "onnx_int8" in config.export and "onnx" not in formats:
            formats.append("onnx")
        try:
            files = export_all(compressed, meta, out, formats, example)
        except ExportError as err:
            raise JobError(str(err)) from None
        dense_meta = ModelMeta(
            config.model.label, num_classes, list(data.input_shape), dict(config.model.options)
        )
        save_model(dense.cpu(), dense_meta, out / DENSE_DIR)
        plots = write_plots(out, compression, config)
    size = None
    dense_file, small_file = out / DENSE_DIR / WEIGHTS_FILE, out / WEIGHTS_FILE
    if dense_file.is_file() and small_file.is_file():
        size = CountChange.of(dense_file.stat().st_size, small_file.stat().st_size)
    return Exports({k: ExportFile.model_validate(v) for k, v in files.items()}, plots, size)


def write_plots(out: Path, compression: Compression, config: JobConfig) -> dict[str, PlotFile]:
    """pareto.png and spectra.png next to report.json."""
    from dataclasses import asdict

    from core.plots import PARETO_FILE, SPECTRA_FILE, plot_pareto, plot_spectra

    title = f"{config.name or config.model.label}: policy {config.compress.policy}"
    points = [asdict(p) for p in compression.search.points]
    written = {
        "pareto": plot_pareto(points, out / PARETO_FILE, title=title),
        "spectra": plot_spectra(compression.spectra, out / SPECTRA_FILE),
    }
    return {k: PlotFile(file=p.name, bytes=p.stat().st_size) for k, p in written.items()}


# ---------------------------------------------------------------------------------------
# assemble
# ---------------------------------------------------------------------------------------


def layer_rows(
    model: nn.Module,
    config: JobConfig,
    compression: Compression,
    training: TrainingInfo | None,
    num_classes: int = 0,
) -> dict[str, LayerRank]:
    """One row per matrix-shaped weight of the dense ``model``: what was done with it and why.

    Keyed by module name (``module.param`` for a module with several weights, e.g. attention).
    """
    from core.lorita import find_targets
    from core.program.graph import ProgramModel

    if isinstance(model, ProgramModel):  # keyed by parameter name, with the ops reading each
        from core.program.job import rows_for_job

        return rows_for_job(model, config, compression.spectra, compression.ranks, training)
    tcfg = config.train
    targets = find_targets(model, tcfg.include if tcfg else (), tcfg.exclude if tcfg else ())
    trained = training is not None and training.factors is not None
    composed = set(training.composed) if training is not None else set()
    skipped = training.skipped if training is not None else {}
    spectra, ranks = compression.spectra, compression.ranks
    rows: dict[str, LayerRank] = {}
    for t in targets:
        key = t.module if t.param == "weight" else t.name
        m, n = t.matrix_shape
        row = LayerRank(
            kind=t.kind,
            shape=[m, n],
            full_rank=min(m, n),
            kept_rank=min(m, n),
            factorized=False,
            composed=(t.name in composed) if trained else None,
            compose_reason=(skipped.get(t.name) or t.reason or None)
            if trained and t.name not in composed
            else None,
        )
        sp = spectra.get(t.module) if t.param == "weight" else None
        if sp is None:
            row.reason = _untouched_reason(model, t)
        else:
            rank = int(ranks.get(t.module, sp.full_rank))
            row.shape, row.full_rank = [sp.m, sp.n], sp.full_rank
            if sp.factorizes(rank):
                row.kept_rank, row.factorized = rank, True
            elif rank >= sp.full_rank:
                row.reason = "the policy kept every singular value"
            else:
                row.reason = (
                    f"a thin pair of rank {rank} would not save parameters "
                    f"({rank} x ({sp.m} + {sp.n}) >= {sp.m} x {sp.n})"
                )
        rows[key] = row
    from core.allocation import classifier_warning

    flagged = classifier_warning(spectra, ranks, config.model.num_classes or num_classes)
    for name, sp in spectra.items():  # a layer the truncation handles but find_targets does not list
        if name not in rows:
            rank = int(ranks.get(name, sp.full_rank))
            f = sp.factorizes(rank)
            rows[name] = LayerRank(
                kind=sp.kind,
                shape=[sp.m, sp.n],
                full_rank=sp.full_rank,
                kept_rank=rank if f else sp.full_rank,
                factorized=f,
                reason=None if f else "the policy kept it dense",
            )
    if flagged is not None and flagged[0] in rows:
        rows[flagged[0]].warning = flagged[1]
    return rows


def _untouched_reason(model: nn.Module, t: WeightTarget) -> str:
    module = model.get_submodule(t.module)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}): not truncated"
    if t.kind.startswith("attention") or isinstance(module, nn.MultiheadAttention):
        return "attention projection: nn.MultiheadAttention reads its weights directly, so it stays dense"
    parent = t.module.rpartition(".")[0]
    if parent and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
        return (
            "attention output projection: nn.MultiheadAttention reads its weight directly, so it stays dense"
        )
    return "not a layer the truncation replaces"


def _versions() -> dict[str, str]:
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def assemble(
    config: JobConfig,
    dense: nn.Module,
    data: DataBundle,
    compression: Compression,
    finetuned: Finetuned,
    measurements: Measurements,
    exports: Exports,
    runner: StageRunner,
    device: torch.device,
    *,
    training: TrainingInfo | None,
    selected_from: str | None = None,
    int8: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
) -> JobReport:
    """The report of a job from what each stage returned (``int8`` and ``summary``: core.deploy)."""
    return JobReport(
        name=config.name,
        config=config.model_dump(mode="json"),
        dataset=DatasetInfo(
            name=data.name,
            num_classes=data.num_classes,
            input_shape=list(data.input_shape),
            n_train=len(data.train),
            n_val=len(data.val),
            n_test=len(data.test),
        ),
        params=measurements.params,
        flops=measurements.flops,
        accuracy=Accuracy(
            val=AccuracyChange(before=compression.dense_val, after=finetuned.val),
            test=AccuracyChange(before=measurements.test_before, after=measurements.test_after),
        ),
        latency_ms=measurements.latency_ms,
        size_bytes=exports.size_bytes,
        ranks=_time_reasons(layer_rows(dense, config, compression, training, data.num_classes), compression),
        pareto=[SearchPoint.model_validate(p) for p in compression.search.points],
        search=SearchInfo(evaluations=len(compression.search.points)),
        training=training,
        finetune=finetuned.info,
        files=exports.files,
        plots=exports.plots,
        timings=dict(runner.timings),
        device=str(device),
        versions=_versions(),
        selected_from=selected_from,
        summary=SpeedSummary.model_validate(summary) if summary else None,
        int8=Int8Info.model_validate(int8) if int8 else None,
        latency_search=LatencySearch.model_validate(compression.latency) if compression.latency else None,
        rounding=Rounding.model_validate(compression.rounding) if compression.rounding else None,
        warnings=result_warnings(config, training, compression.dense_val),
    )


def _time_reasons(rows: dict[str, LayerRank], compression: Compression) -> dict[str, LayerRank]:
    """Under latency_budget, say in each row why a layer stayed dense for time."""
    reasons = (compression.latency or {}).get("reasons", {})
    for name, reason in reasons.items():
        row = rows.get(name)
        if row is not None and not row.factorized:
            row.reason = reason
    return rows
