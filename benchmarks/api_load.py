"""Load on the status endpoint while a job trains, and the time from POST /v1/jobs to running.

    python benchmarks/api_load.py             # lorita serve + lorita worker on Postgres + Redis
    python benchmarks/api_load.py --embedded  # lorita serve alone (SQLite + the local broker)

Starts the service as real processes, creates a key, waits until the worker is ready, submits
a job that trains for a while, then ``--clients`` concurrent clients poll ``GET /v1/jobs/{id}``
for ``--seconds``. Prints requests/s, p50/p99 latency, errors, and the dispatch time (POST ->
status running).

Note: the load generator shares the machine with the API, the worker and PostgreSQL, so its
own CPU time is taken from what it measures. httpx spends milliseconds of CPU per request at this
concurrency (more than the API does), so the polling clients are a minimal HTTP/1.1 keep-alive
client on asyncio streams instead: one connection each, a request written, the status line and
the Content-Length body read. Latency is still measured end to end, from the write to the last
byte of the body.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.client import ClientError, LoritaClient, RetryPolicy  # noqa: E402
from cli.demo import create_key, lorita, running_service, service_env, start, stop  # noqa: E402
from store.status import JobStatus  # noqa: E402

JOB = {
    "model": {"arch": "fcn", "options": {"depth": 3, "width": 256}},
    "dataset": {"name": "synthetic", "num_classes": 10, "input_shape": [64], "n_train": 20000, "n_test": 500},
    "train": {"factors": 3, "epochs": 400, "batch_size": 64},
    "compress": {"policy": "global", "keep": 0.5},
    "measure": {"latency": False},
    "export": ["safetensors"],
    "device": "cpu",
}


REQUEST_TIMEOUT_S = 30.0


class HttpError(Exception):
    """A malformed response (the kind is the message)."""


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """One GET on a keep-alive connection: (status, whether the server keeps the connection)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise HttpError("BadStatusLine")
    length, keep = None, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
    if length is None:
        raise HttpError("NoContentLength")
    await reader.readexactly(length)
    return int(parts[1]), keep


async def poll(
    host: str,
    port: int,
    request: bytes,
    until: float,
    latencies: list[float],
    errors: list[str],
    interval: float = 0.0,
) -> None:
    """Poll until ``until``: back to back (``interval`` 0, a closed loop measuring capacity) or
    one request every ``interval`` seconds, as a status poller does (starts spread at random)."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    if interval > 0:
        await asyncio.sleep(random.uniform(0, interval))
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection(host, port), REQUEST_TIMEOUT_S)
            status, keep = await asyncio.wait_for(_get(*conn, request), REQUEST_TIMEOUT_S)
            if status != 200:
                errors.append(f"HTTP {status}")
            if not keep:
                conn[1].close()
                conn = None
        except (OSError, TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError) as err:
            errors.append("ReadTimeout" if isinstance(err, TimeoutError) else type(err).__name__)
            if conn is not None:
                conn[1].close()
                conn = None
        latencies.append(time.perf_counter() - t0)
        if interval > 0:
            await asyncio.sleep(max(0.0, t0 + interval - time.perf_counter()))
    if conn is not None:
        conn[1].close()


async def load(
    url: str, key: str, job_id: str, clients: int, seconds: float, interval: float = 0.0
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    request = (
        f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    start_t = time.perf_counter()
    until = start_t + seconds
    await asyncio.gather(
        *(poll(host, port, request, until, latencies, errors, interval) for _ in range(clients))
    )
    elapsed = time.perf_counter() - start_t
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }


def run_async(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """``asyncio.run`` on uvloop where it is installed (it is with uvicorn[standard]): a cheaper
    client loop leaves more of the shared CPU to what is measured."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def wait_worker_ready(log: Path, worker: Any, timeout: float = 120) -> float:
    """Seconds until the Celery worker logs that it is ready (consuming its queues)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}; see {log}")
        if log.is_file() and " ready." in log.read_text(errors="replace"):
            return time.perf_counter() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the worker was not ready after {timeout:.0f} s; see {log}")


def dispatch_time(client: LoritaClient, job_id: str, posted_at: float, timeout: float = 120) -> float:
    while time.perf_counter() - posted_at < timeout:
        if client.job(job_id)["status"] != JobStatus.QUEUED:
            return time.perf_counter() - posted_at
        time.sleep(0.02)
    raise RuntimeError("the job was not picked up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--embedded", action="store_true", help="SQLite + the local broker instead of Postgres + Redis"
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="lorita serve --workers (API processes)")
    parser.add_argument(
        "--no-access-log", action="store_true", help="lorita serve --no-access-log (no line per request)"
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="Seconds between one client's polls (0: back to back, which measures capacity).",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keep-logs", default=None, help="Copy the service and worker logs here.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorita-bench-") as tmp:
        workdir = Path(tmp)
        db_name = None
        if args.embedded:
            env = service_env(workdir, OMP_NUM_THREADS="1")
        else:
            import psycopg
            import redis

            db_name = f"lorita_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.pg_admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db_name}"')
            redis.Redis.from_url(args.redis).flushdb()
            env = service_env(
                workdir,
                LORITA_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}",
                LORITA_BROKER_URL=args.redis,
                LORITA_QUEUE="cpu",
                LORITA_TORCH_THREADS="1",  # the job leaves the other core to the API under load
                OMP_NUM_THREADS="1",
            )
        worker = None
        ready_s: float | None = None
        try:
            serve_args: tuple[str, ...] = ("--workers", str(args.workers))
            if args.no_access_log:
                serve_args += ("--no-access-log",)
            with running_service(workdir, env, serve_args) as url:
                key = create_key(env, workdir, "bench")
                if not args.embedded:
                    worker_log = workdir / "w.log"
                    worker = start(lorita("worker", "--queue", "cpu"), env, workdir, worker_log.open("ab"))
                    # dispatch is timed against a ready worker, not against its start-up
                    ready_s = wait_worker_ready(worker_log, worker)
                # no retries after the load: a status read that fails is a finding, not a hiccup
                no_retry = RetryPolicy(give_up_after_s=0.0)
                with LoritaClient(url, key, timeout_s=30, retry=no_retry) as c:
                    posted = time.perf_counter()
                    job_id = c.submit(JOB)["id"]
                    post_s = time.perf_counter() - posted
                    dispatch = dispatch_time(c, job_id, posted)
                    stats = run_async(load(url, key, job_id, args.clients, args.seconds, args.interval))
                    t0 = time.perf_counter()
                    try:
                        status = c.job(job_id)
                        c.cancel(job_id)
                    except ClientError as err:
                        status = {"status": f"unreadable ({err})", "stage": None, "epoch": None}
                    after_load_s = time.perf_counter() - t0
        finally:
            if worker is not None:
                stop(worker)
            if args.keep_logs:
                keep = Path(args.keep_logs)
                keep.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    shutil.copy(log, keep / log.name)
            if db_name is not None:
                import psycopg

                with psycopg.connect(args.pg_admin, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    mode = "embedded (SQLite + filesystem broker)" if args.embedded else "Postgres + Redis"
    print(
        f"mode: {mode}, {args.workers} API process(es); "
        f"{args.clients} clients polling GET /v1/jobs/{{id}} for {args.seconds:.0f} s, "
        + (f"each every {args.interval:g} s" if args.interval > 0 else "back to back (capacity)")
    )
    print(f"job during the load: status {status['status']}, stage {status['stage']}, epoch {status['epoch']}")
    print(f"requests:      {stats['requests']}")
    print(f"requests/s:    {stats['rps']:.1f}")
    print(f"latency p50:   {stats['p50_ms']:.1f} ms")
    print(f"latency p99:   {stats['p99_ms']:.1f} ms   (goal < 50 ms: {stats['p99_ms'] / 50:.2f}x the goal)")
    print(f"errors:        {stats['errors']} {stats['error_kinds'] or ''}")
    print(f"after the load: a status read + cancel took {after_load_s:.2f} s")
    if ready_s is not None:
        print(f"worker ready:  {ready_s:.1f} s after its start (dispatch is timed after this)")
    print(
        f"dispatch:      {dispatch:.2f} s from POST /v1/jobs to running (goal < 2 s); "
        f"the POST itself answered in {post_s:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
