"""Load on the status endpoint while a job trains, and the time from POST /v1/jobs to running.

    python benchmarks/api_load.py             # lorita serve + lorita worker on Postgres + Redis
    python benchmarks/api_load.py --embedded  # lorita serve alone (SQLite + the local broker)

Starts the service as real processes, creates a key, submits a job that trains for a while,
then ``--clients`` concurrent httpx clients poll ``GET /v1/jobs/{id}`` for ``--seconds``.
Prints requests/s, p50/p99 latency, errors, and the dispatch time (POST -> status running).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.demo import create_key, lorita, running_service, service_env, start, stop  # noqa: E402

JOB = {
    "model": {"arch": "fcn", "options": {"depth": 3, "width": 256}},
    "dataset": {"name": "synthetic", "num_classes": 10, "input_shape": [64], "n_train": 20000, "n_test": 500},
    "train": {"factors": 3, "epochs": 12, "batch_size": 64},
    "compress": {"policy": "global", "keep": 0.5},
    "measure": {"latency": False},
    "export": ["safetensors"],
    "device": "cpu",
}


async def poll(
    client: httpx.AsyncClient, path: str, until: float, latencies: list[float], errors: list[str]
) -> None:
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            resp = await client.get(path)
            if resp.status_code != 200:
                errors.append(f"HTTP {resp.status_code}")
        except httpx.HTTPError as err:
            errors.append(type(err).__name__)
        latencies.append(time.perf_counter() - t0)


async def load(url: str, key: str, job_id: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        start_t = time.perf_counter()
        until = start_t + seconds
        await asyncio.gather(
            *(poll(client, f"/v1/jobs/{job_id}", until, latencies, errors) for _ in range(clients))
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


def dispatch_time(client: httpx.Client, job_id: str, posted_at: float, timeout: float = 120) -> float:
    while time.perf_counter() - posted_at < timeout:
        if client.get(f"/v1/jobs/{job_id}").json()["status"] != "queued":
            return time.perf_counter() - posted_at
        time.sleep(0.02)
    raise RuntimeError("the job was not picked up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--embedded", action="store_true", help="SQLite + the local broker instead of Postgres + Redis"
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
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
                OMP_NUM_THREADS="1",
            )
        worker = None
        try:
            with running_service(workdir, env) as url:
                key = create_key(env, workdir, "bench")
                if not args.embedded:
                    worker = start(
                        lorita("worker", "--queue", "cpu"), env, workdir, (workdir / "w.log").open("ab")
                    )
                    time.sleep(8)  # let the worker connect before timing the dispatch
                with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
                    posted = time.perf_counter()
                    job_id = c.post("/v1/jobs", json=JOB).json()["id"]
                    dispatch = dispatch_time(c, job_id, posted)
                    stats = asyncio.run(load(url, key, job_id, args.clients, args.seconds))
                    t0 = time.perf_counter()
                    try:
                        status = c.get(f"/v1/jobs/{job_id}").json()
                        c.post(f"/v1/jobs/{job_id}/cancel")
                    except httpx.HTTPError as err:
                        status = {
                            "status": f"unreadable ({type(err).__name__})",
                            "stage": None,
                            "epoch": None,
                        }
                    after_load_s = time.perf_counter() - t0
        finally:
            if worker is not None:
                stop(worker)
            if db_name is not None:
                import psycopg

                with psycopg.connect(args.pg_admin, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    mode = "embedded (SQLite + filesystem broker)" if args.embedded else "Postgres + Redis"
    print(f"mode: {mode}; {args.clients} clients polling GET /v1/jobs/{{id}} for {args.seconds:.0f} s")
    print(f"job during the load: status {status['status']}, stage {status['stage']}, epoch {status['epoch']}")
    print(f"requests:      {stats['requests']}")
    print(f"requests/s:    {stats['rps']:.1f}")
    print(f"latency p50:   {stats['p50_ms']:.1f} ms")
    print(f"latency p99:   {stats['p99_ms']:.1f} ms   (goal < 50 ms: {stats['p99_ms'] / 50:.2f}x the goal)")
    print(f"errors:        {stats['errors']} {stats['error_kinds'] or ''}")
    print(f"after the load: a status read + cancel took {after_load_s:.2f} s")
    print(f"dispatch:      {dispatch:.2f} s from POST /v1/jobs to running (goal < 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
