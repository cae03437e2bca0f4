"""The fault-injection rig: our own PostgreSQL and Redis on spare loopback ports (never the
machine's shared ones), and the service as real processes (``lorita serve`` and ``lorita worker``)
with short leases, so that each scenario takes seconds.

PostgreSQL: ``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` (or PATH) into a temporary
folder; as root the server runs as the ``postgres`` user (initdb refuses root). Redis runs without
persistence, so a restart loses the queued messages, as a crashed Redis would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cli.demo import create_key, free_port, lorita, service_env, start, stop, wait_healthy


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    path = found[-1] if found else shutil.which(name)
    if path is None:
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return path


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class Postgres:
    data: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/lorita"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*_as_postgres(), pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.ctl("-m", mode, "-w", "stop")


@dataclass
class Redis:
    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(cmd, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        import redis

        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def own_postgres() -> Iterator[Postgres]:
    if not shutil.which("runuser") and os.geteuid() == 0:
        pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
    # outside pytest's folders: those are private to this user, and the server may run as postgres
    base = Path(tempfile.mkdtemp(prefix="lorita-faults-pg-"))
    data = base / "data"
    data.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for p in (base, data):
            os.chown(p, user.pw_uid, user.pw_gid)
    subprocess.run(
        [*_as_postgres(), pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pg = Postgres(data, free_port(), base / "pg.log")
    if os.geteuid() == 0:
        pg.log.touch()
        os.chown(pg.log, pwd.getpwnam("postgres").pw_uid, -1)
    pg.start()
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE lorita")
    try:
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Rig:
    """The running service: one API process on a fixed port, workers by name."""

    root: Path
    env: dict[str, str]
    port: int
    pg: Postgres
    redis: Redis
    api: subprocess.Popen[bytes] | None = None
    key: str = ""
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout
        )

    def start_api(self) -> None:
        log = (self.root / "api.log").open("ab")
        self.api = start(lorita("serve", "--port", str(self.port), "--no-worker"), self.env, self.root, log)
        wait_healthy(self.url, self.api, timeout=120)

    def stop_api(self) -> None:
        if self.api is not None:
            stop(self.api)
            self.api = None

    def start_worker(self, name: str, **extra: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"worker-{name}.log").open("ab")
        proc = start(lorita("worker", "--queue", "cpu"), self.env | extra, self.root, log)
        self.workers[name] = proc
        return proc

    def stop_worker(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.workers.pop(name, None)
        if proc is not None:
            stop(proc, sig=sig)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, own_postgres: Postgres, own_redis: Redis) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("service")
    env = service_env(
        root,
        LORITA_DATABASE_URL=own_postgres.url,
        LORITA_BROKER_URL=own_redis.url,
        LORITA_QUEUE="cpu",
        LORITA_LEASE_SECONDS="5",
        LORITA_SWEEP_INTERVAL="1",
        LORITA_HOUSEKEEPING_INTERVAL="2",
        LORITA_AUTH_CACHE_SECONDS="60",
        # a job merely stuck in the queue is re-sent after an hour: only the broker watch re-sends
        # sooner, so a job that runs after a Redis restart proves that path
        LORITA_REQUEUE_QUEUED_AFTER="3600",
        LORITA_LOG_FORMAT="json",
        OMP_NUM_THREADS="1",
    )
    rig = Rig(root, env, free_port(), own_postgres, own_redis)
    subprocess.run(lorita("db", "upgrade"), env=env, cwd=root, check=True, capture_output=True, timeout=120)
    rig.key = create_key(env, root, "faults")
    rig.start_api()
    try:
        yield rig
    finally:
        for name in list(rig.workers):
            rig.stop_worker(name, sig=signal.SIGKILL)
        rig.stop_api()
