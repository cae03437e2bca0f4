"""The service commands: serve, worker, db upgrade, keys create|list|revoke, submit.

``lorita serve`` with no settings is the embedded mode: a SQLite file, the filesystem broker and
a ``lorita worker`` child process, everything under ``./var``. With ``LORITA_BROKER_URL`` set it
runs the API alone (start workers with ``lorita worker``). ``lorita submit`` talks to the service
through :class:`cli.client.LoritaClient`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cli.client import ClientError, LoritaClient
from cli.output import fail
from cli.processes import Supervisor
from core.progress import Progress, Stage
from store.settings import QUEUES
from store.status import JobStatus

# --------------------------------------------------------------------------------------------
# serve / worker


def _die_with_parent() -> None:
    """Get SIGTERM when the parent dies, even by SIGKILL (Linux only; elsewhere a no-op).

    Called by the child itself at its start (``lorita worker --die-with-parent``), not as a
    ``preexec_fn``: ``serve`` restarts its worker from a thread, and Python code between fork
    and exec in a threaded process can deadlock on a lock another thread held at the fork.
    """
    parent = os.getppid()
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def spawn_worker(
    queues: str, concurrency: int = 1, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``lorita worker`` as a child in its own process group, stopped when this process dies."""
    cmd = [sys.executable, "-m", "cli.main", "worker", "--queue", queues, "--concurrency", str(concurrency)]
    return subprocess.Popen([*cmd, "--die-with-parent"], env=env, start_new_session=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from store.admin import upgrade_db
    from store.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as err:
        return fail(str(err))
    try:
        upgrade_db()
    except Exception as err:
        return fail(f"cannot prepare the database: {err}", 1)
    embedded = settings.broker_url is None
    if args.workers < 1:
        return fail(f"--workers {args.workers}: give 1 or more API processes")
    with_worker = embedded if args.worker is None else args.worker
    worker = Supervisor(lambda: spawn_worker("gpu,cpu", args.concurrency)) if with_worker else None
    if embedded:
        print(
            f"lorita: embedded mode (database {settings.database_url}, local broker, "
            f"artifacts in {settings.artifact_dir})",
            file=sys.stderr,
        )

    import uvicorn

    # uvicorn turns SIGTERM into a graceful exit; make sure the worker child follows.
    try:
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="info",
            access_log=args.access_log,
        )
    finally:
        if worker is not None:
            worker.stop(timeout=20.0)
    return 0


def probe_queue() -> str:
    """``gpu`` if CUDA works, else ``cpu``; asked in a subprocess so this process never touches CUDA."""
    code = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
    try:
        done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "gpu" if done.returncode == 0 else "cpu"


def parse_queues(value: str | None) -> list[str]:
    if not value:
        return [probe_queue()]
    queues = [q.strip() for q in value.split(",") if q.strip()]
    bad = [q for q in queues if q not in QUEUES]
    if bad or not queues:
        raise ValueError(f"--queue {value!r}: give gpu, cpu or both as 'gpu,cpu'")
    return queues


def cmd_worker(args: argparse.Namespace) -> int:
    from store.settings import SettingsError, load_settings

    if args.die_with_parent:
        _die_with_parent()

    try:
        load_settings()
        queues = parse_queues(args.queue)
    except (SettingsError, ValueError) as err:
        return fail(str(err))
    from worker.celery_app import app

    name = f"lorita-{'-'.join(queues)}-{os.getpid()}@%h"
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(args.concurrency),
        "--pool",
        "prefork",
        "--hostname",
        name,
        "--loglevel",
        args.loglevel,
        "--without-mingle",
        "--without-gossip",
    ]
    print(f"lorita: worker on queue(s) {', '.join(queues)}", file=sys.stderr)
    app.worker_main(argv)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from store.admin import upgrade_db

    try:
        upgrade_db()
    except Exception as err:
        return fail(f"database upgrade failed: {err}", 1)
    print("database is up to date", file=sys.stderr)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from store.admin import AdminError, create_api_key

    try:
        key = create_api_key(args.tenant)
    except AdminError as err:
        return fail(f"cannot create a key: {err}", 1)
    print(key)
    return 0


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def cmd_keys_list(args: argparse.Namespace) -> int:
    from store.admin import AdminError, list_api_keys

    try:
        keys = list_api_keys(args.tenant)
    except AdminError as err:
        return fail(str(err), 1)
    if not keys:
        print(f"tenant {args.tenant!r} has no keys", file=sys.stderr)
        return 0
    print(f"{'prefix':<10}  {'created':<23}  revoked")
    for k in keys:
        print(f"{k.prefix:<10}  {_when(k.created_at):<23}  {_when(k.revoked_at)}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from store.admin import AdminError, revoke_api_keys

    try:
        (revoked,) = revoke_api_keys(args.prefix, args.tenant)
    except AdminError as err:
        return fail(str(err), 1)
    print(
        f"revoked key {revoked.prefix}... of tenant {revoked.tenant!r}; the API refuses it within "
        "LORITA_AUTH_CACHE_SECONDS",
        file=sys.stderr,
    )
    return 0


# --------------------------------------------------------------------------------------------
# submit: uploads what the config names, submits, follows, downloads (through cli.client)


def npz_shape(path: Path) -> tuple[list[int], int] | None:
    """(input shape, class count) of an .npz dataset, or None if it is not one."""
    if path.suffix.lower() != ".npz":
        return None
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        x, y = data["x_train"], data["y_train"]
        return [int(d) for d in x.shape[1:]], int(y.max()) + 1


def _local_path(value: str, base: Path, from_flag: bool) -> Path:
    path = Path(value)
    return path if from_flag or path.is_absolute() else base / path


def prepare_config(
    client: LoritaClient, config: dict[str, Any], base: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Upload the local dataset / weights / program the config (or the flags) name; put their ids in.

    Paths in the config are relative to the config file. The weights' input shape and class
    count come from the flags, else the config, else the uploaded .npz dataset.
    """
    config = json.loads(json.dumps(config))
    model = config.setdefault("model", {})
    dataset = config.setdefault("dataset", {})
    if args.arch:
        model["arch"] = args.arch
    data_shape: tuple[list[int], int] | None = None
    data_path = args.dataset or dataset.get("path")
    if data_path:
        path = _local_path(data_path, base, bool(args.dataset))
        if not path.is_file():
            raise ClientError(f"dataset {path}: no such file (give an .npz or an ImageFolder archive)")
        data_shape = npz_shape(path)
        dataset_id = str(client.upload_dataset(path)["id"])
        print(f"uploaded dataset {path} as {dataset_id}", file=sys.stderr)
        for key in ("path", "name"):
            dataset.pop(key, None)
        dataset["id"] = dataset_id
    program = model.get("program")
    if program:
        path = _local_path(program, base, False)
        if path.is_file():  # otherwise the id of a program uploaded before
            model["program"] = str(client.upload_program(path)["id"])
            print(f"uploaded program {path} as model {model['program']}", file=sys.stderr)
    weights = args.weights or model.get("weights")
    if weights:
        path = _local_path(weights, base, bool(args.weights))
        if not path.is_file():
            if args.weights:
                raise ClientError(f"--weights {args.weights}: no such file")
            return config  # an id of weights uploaded before
        if not model.get("arch"):
            raise ClientError("--weights needs the architecture: give --arch or model.arch in the config")
        num_classes = args.num_classes or model.get("num_classes") or (data_shape and data_shape[1])
        input_shape = (
            [int(d) for d in args.input_shape.split(",")]
            if args.input_shape
            else data_shape and data_shape[0]
        )
        if not num_classes or not input_shape:
            raise ClientError("uploading weights needs --num-classes and --input-shape (e.g. 3,32,32)")
        uploaded = client.upload_model(
            path,
            arch=model["arch"],
            num_classes=int(num_classes),
            input_shape=list(input_shape),
            options=model.get("options") or {},
        )
        model["weights"] = str(uploaded["id"])
        print(f"uploaded weights {path} as model {model['weights']}", file=sys.stderr)
    return config


def progress_from_job(job: dict[str, Any]) -> Progress:
    """The progress bar's view of a job as ``GET /v1/jobs/{id}`` returns it."""
    stage = job["stage"] or job["status"]
    # The job row keeps the last epoch and loss; they only describe the training stages.
    training = stage in (Stage.TRAIN, Stage.FINETUNE)
    metrics = job["metrics"]
    return Progress(
        stage=stage,
        fraction=float(job["progress"]),
        epoch=job["epoch"] if training else None,
        epochs=job["epochs"] if training else None,
        loss=metrics.get("loss") if training else None,
        val_accuracy=metrics.get("val_accuracy") if training else None,
    )


def follow_job(client: LoritaClient, job_id: str, show: bool = True) -> dict[str, Any]:
    """Wait for the job with a progress bar (its retry messages printed above the bar)."""
    from cli.output import progress_bar

    with progress_bar(disable=not show) as on_progress:

        def on_update(job: dict[str, Any]) -> None:
            status = JobStatus(job["status"])
            if status is JobStatus.RUNNING or status.finished:
                on_progress(progress_from_job(job))

        return client.wait(job_id, on_update=on_update)


def _say_above_the_bar(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"lorita: {message}", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    from cli.output import format_report_table
    from store.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as err:
        return fail(str(err))
    key = args.key or settings.api_key
    url = args.url or settings.url
    if not key:
        return fail("no API key: pass --key or set LORITA_API_KEY (create one with `lorita keys create`)")
    config_path = Path(args.config)
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        return fail(f"config file {config_path} does not exist")
    except json.JSONDecodeError as err:
        return fail(f"{config_path} is not valid JSON: {err}")
    if not isinstance(config, dict):
        return fail(f"{config_path} must hold a JSON object")
    try:
        with LoritaClient(url, key, on_retry=_say_above_the_bar) as client:
            config = prepare_config(client, config, config_path.resolve().parent, args)
            job = client.submit(config)
            job_id = job["id"]
            print(f"job {job_id} {job['status']}", file=sys.stderr)
            if args.no_wait:
                print(job_id)
                return 0
            job = follow_job(client, job_id, show=not args.quiet)
            if job["status"] != JobStatus.SUCCEEDED:
                reason = job["error"] or job["status"]
                return fail(f"job {job_id} {job['status']}: {reason}", 1)
            out = Path(args.out or f"lorita-{job_id}")
            paths = client.download_artifacts(job_id, out)
            report = client.report(job_id)
    except ClientError as err:
        return fail(str(err), 1)
    print(format_report_table(report))
    print(f"job {job_id} succeeded; {len(paths)} artifacts (sha256 checked) in {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    from store.settings import settings_help

    p = sub.add_parser(
        "serve",
        help="Run the HTTP service (embedded worker when no broker is set).",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=1, help="Jobs the embedded worker runs at once.")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (uvicorn workers), each with its own LORITA_DB_POOL_SIZE connections; "
        "more than 1 pays off with PostgreSQL and several cores (default: 1).",
    )
    p.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="Do not log every request (uvicorn's access log).",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--worker", dest="worker", action="store_true", default=None, help="Start a worker child."
    )
    group.add_argument(
        "--no-worker", dest="worker", action="store_false", help="Do not start a worker child."
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker",
        help="Run a job worker (Celery).",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--queue", default=None, help="gpu, cpu or 'gpu,cpu'; default: gpu if CUDA works, else cpu."
    )
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--die-with-parent", action="store_true", help=argparse.SUPPRESS)  # lorita serve's child
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("db", help="Database administration.")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    q = db_sub.add_parser("upgrade", help="Apply the migrations (alembic upgrade head).")
    q.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser(
        "keys",
        help="API keys.",
        description="API keys, in the database LORITA_DATABASE_URL names (by default the embedded "
        "./var/lorita.db, relative to the current directory: run these where `lorita serve` runs).",
    )
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    q = keys_sub.add_parser("create", help="Create an API key; prints the key alone on stdout.")
    q.add_argument("--tenant", required=True)
    q.set_defaults(func=cmd_keys_create)
    q = keys_sub.add_parser(
        "list", help="A tenant's keys (their prefixes, never the keys), revoked ones too."
    )
    q.add_argument("--tenant", required=True)
    q.set_defaults(func=cmd_keys_list)
    q = keys_sub.add_parser("revoke", help="Revoke the key that starts with KEY_PREFIX (see `keys list`).")
    q.add_argument("prefix", metavar="KEY_PREFIX", help="The prefix `lorita keys list` shows, or the key.")
    q.add_argument("--tenant", default=None, help="Only this tenant's keys.")
    q.set_defaults(func=cmd_keys_revoke)

    p = sub.add_parser("submit", help="Submit a job to a running service, follow it, download its artifacts.")
    p.add_argument("config", help="The job config (JSON).")
    p.add_argument("--url", default=None, help="The service (default: $LORITA_URL, http://127.0.0.1:8000).")
    p.add_argument("--key", default=None, help="API key (default: $LORITA_API_KEY).")
    p.add_argument("--weights", default=None, help="Upload these weights first (.safetensors or .pt).")
    p.add_argument("--arch", default=None, help="Architecture of --weights (default: model.arch).")
    p.add_argument("--num-classes", type=int, default=None, help="Classes of --weights (default: config).")
    p.add_argument("--input-shape", default=None, help="Input shape of --weights, e.g. 3,32,32.")
    p.add_argument(
        "--dataset", default=None, help="Upload this dataset first (.npz or an ImageFolder archive)."
    )
    p.add_argument(
        "--out", default=None, help="Where to download the artifacts (default: ./lorita-<job id>)."
    )
    p.add_argument("--no-wait", action="store_true", help="Print the job id and return.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.set_defaults(func=cmd_submit)
