"""The whole job: build -> LoRITa train -> collapse -> compress -> fine-tune -> measure -> export.

Contract used by the CLI and the worker:

    report = run_job(config, out_dir, work_dir=..., progress=fn, should_stop=fn)

- ``out_dir`` receives the artifacts: model.safetensors, model.json, model.pt2, model.onnx,
  report.json (and plots / spectra for ``lorita select``).
- ``work_dir`` holds the training checkpoint (``checkpoint.pt``, written atomically each
  epoch); when one is there, training resumes from it. Defaults to ``out_dir / "work"``.
- ``progress`` receives :class:`core.progress.Progress` reports.
- ``should_stop`` is polled between steps; when it returns True the run raises
  :class:`core.progress.JobCanceled`.
- A :class:`core.progress.JobError` or :class:`core.config.ConfigError` carries a message for
  a person. Returns the report dict (also written to ``out_dir / "report.json"``).
"""
