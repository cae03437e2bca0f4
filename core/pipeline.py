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
  a person. Returns the :class:`core.report.JobReport` (also written to ``out_dir / "report.json"``).

The stages themselves (typed inputs and outputs) are in :mod:`core.stages`.

    report = select(job_dir, {"policy": "params_budget", "budget": 0.2}, new_dir)

picks another operating point from a finished job without training again (``lorita select``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import ConfigError, JobConfig
from core.deploy import deployment
from core.progress import ProgressFn, Stage, StopFn
from core.report import REPORT_FILE, JobReport, ReportError, TrainingInfo, read_report
from core.stages import (
    CHECKPOINT_FILE,
    DENSE_DIR,
    Compression,
    Prepared,
    StageRunner,
    assemble,
    build,
    collapse,
    compress,
    export,
    finetune,
    finetune_settings,
    measure,
    prepare,
    train,
    train_settings,
)

__all__ = [
    "CHECKPOINT_FILE",
    "DENSE_DIR",
    "REPORT_FILE",
    "build",
    "finetune_settings",
    "read_job_report",
    "run_job",
    "select",
    "select_config",
    "train_settings",
]


def run_job(
    config: JobConfig,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> JobReport:
    """Run the whole job of ``config``; write the artifacts into ``out_dir``; return the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir is not None else out / "work"
    runner = StageRunner(progress, should_stop)

    prepared = prepare(config, runner)
    training = TrainingInfo(factors=None)
    if config.train is not None:
        training = train(config, config.train, prepared, runner, work)
        collapse(prepared.model, runner)
    return _from_dense(config, prepared, out, runner, training=training)


def _from_dense(
    config: JobConfig,
    prepared: Prepared,
    out: Path,
    runner: StageRunner,
    *,
    training: TrainingInfo | None,
    selected_from: str | None = None,
) -> JobReport:
    """compress -> finetune -> measure -> export -> assemble, from the collapsed dense model."""
    dense, data, device = prepared.model, prepared.data, prepared.device
    dense.to(device).eval()
    compression: Compression = compress(config, dense, data, runner)
    # skipped when finetune.epochs is 0; distills from the dense model when finetune.distill is set
    finetuned = finetune(config, compression, data, device, runner, teacher=dense)
    measurements = measure(config, dense, finetuned.model, data, runner)
    exports = export(config, dense, finetuned.model, compression, data, prepared.num_classes, out, runner)
    with runner.stage(Stage.EXPORT, "INT8 and the dense / compressed / INT8 summary"):
        int8, summary = deployment(
            config,
            dense,
            finetuned.model,
            data,
            out,
            dense_val=compression.dense_val,
            compressed_val=finetuned.val,
            test_before=measurements.test_before,
            test_after=measurements.test_after,
            device=device,
        )
    report = assemble(
        config,
        dense,
        data,
        compression,
        finetuned,
        measurements,
        exports,
        runner,
        device,
        training=training,
        selected_from=selected_from,
        int8=int8,
        summary=summary,
    )
    report.write(out / REPORT_FILE)
    runner.done()
    return report


# ---------------------------------------------------------------------------------------
# lorita select: another operating point from a finished job, without training again
# ---------------------------------------------------------------------------------------


def read_job_report(job_dir: str | Path) -> JobReport:
    """The report of a finished job's output directory (ConfigError when unusable)."""
    path = Path(job_dir) / REPORT_FILE
    if not Path(job_dir).is_dir():
        raise ConfigError(f"{job_dir} is not a directory; give the --out directory of a finished job")
    if not path.is_file():
        raise ConfigError(f"{job_dir} has no {REPORT_FILE}; give the --out directory of a finished job")
    try:
        return read_report(path)
    except ReportError as err:
        raise ConfigError(f"{path}: {err}") from None


def select_config(
    job_dir: str | Path, compress: dict[str, Any], *, finetune: bool = False, device: str | None = None
) -> tuple[JobConfig, JobReport]:
    """The job config ``select`` runs (the job's, with ``compress``) and the job's report.

    Raises ConfigError when ``job_dir`` is not a finished job or the policy is invalid.
    """
    from core.config import parse_config

    original = read_job_report(job_dir)
    raw = dict(original.config)
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
) -> JobReport:
    """Choose another operating point from the job in ``job_dir`` without training again.

    Starts from the collapsed dense model the job saved (``job_dir/dense``), reloads the
    job's data (same config and seed, so the same validation split), recomputes the spectra
    and runs ``compress`` (a policy as in the job config) with the same search. Writes a
    full set of artifacts and a report into ``out_dir``. Fine-tuning (the job's
    ``finetune`` settings) runs only when ``finetune`` is true; otherwise the new report's
    config says ``finetune.epochs = 0``. With the job's own policy (and fine-tuning as the
    job did) the ranks and figures are those of the job.
    """
    from core.data import load_job_data
    from core.export import ModelMetaError, WeightsError, load_model, read_meta
    from core.program.job import is_program_dir, load_dense_program
    from core.progress import Stage
    from core.train import resolve_device

    source = Path(job_dir)
    config, original = select_config(source, compress, finetune=finetune, device=device)

    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise ConfigError("the output directory must differ from the job's directory")
    runner = StageRunner(progress, should_stop)
    if is_program_dir(source / DENSE_DIR):  # a program job: its dense program, validated again
        with runner.stage(Stage.PREPARE, "loading the dense program and the data"):
            data = load_job_data(config)
            program = load_dense_program(source / DENSE_DIR, data)
            prepared = Prepared(program, data, program.num_classes, resolve_device(config.device))
        out.mkdir(parents=True, exist_ok=True)
        return _from_dense(
            config, prepared, out, runner, training=original.training, selected_from=str(source)
        )
    with runner.stage(Stage.PREPARE, "loading the dense model and the data"):
        try:
            meta = read_meta(source / DENSE_DIR)
            model = load_model(source / DENSE_DIR)
        except (ModelMetaError, WeightsError) as err:
            raise ConfigError(
                f"cannot reload the job's dense model from {source / DENSE_DIR}: {err}"
            ) from None
        if meta.ranks:
            raise ConfigError(f"{source / DENSE_DIR} holds a compressed model; select needs the dense one")
        data = load_job_data(config)
        if list(data.input_shape) != list(meta.input_shape):
            raise ConfigError(
                f"the data now has input shape {list(data.input_shape)} but the job's model takes "
                f"{meta.input_shape}; the dataset changed since the job ran"
            )
        prepared = Prepared(model, data, meta.num_classes, resolve_device(config.device))
    out.mkdir(parents=True, exist_ok=True)
    return _from_dense(
        config,
        prepared,
        out,
        runner,
        training=original.training,
        selected_from=str(source),
    )
