"""The README's first command (``make demo`` / ``python -m cli.demo``).

Starts ``lorita serve`` in the embedded mode (SQLite, the local broker, a worker child; nothing
to install) in a scratch directory on a free port, creates an API key, submits
``examples/digits_fcn.json`` with ``lorita submit``, downloads the artifacts (sha256 checked),
reloads ``model.safetensors`` with ``core.export.load_model`` and checks that its accuracy on the
digits test split equals the report's, prints the table, and stops the service.

The helpers here (free port, starting and stopping the service) are shared by the e2e tests and
``benchmarks/api_load.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cli.client import LoritaClient
from cli.processes import stop_process_group
from store.settings import child_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits_fcn.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of a service rooted in ``workdir`` (embedded unless ``extra`` says otherwise).

    None of this process's ``LORITA_*`` settings leak in; ``extra`` may set other variables, and
    settings by their ``LORITA_*`` names (checked against ``store.settings.Settings``).
    """
    var = workdir / "var"
    settings = {
        "database_url": f"sqlite:///{var / 'lorita.db'}",
        "artifact_dir": str(var / "artifacts"),
        "broker_dir": str(var / "broker"),
        "var_dir": str(var),
    }
    return child_env(settings, prepend_paths={"PYTHONPATH": str(ROOT)}, **extra)


def lorita(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def start(
    cmd: list[str], env: dict[str, str], cwd: Path, log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """A process in its own group, so that it and its children can be signalled together."""
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


stop = stop_process_group  # the name the e2e tests and benchmarks use


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    with LoritaClient(url) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {proc.returncode} before it was ready")
            if client.ready():
                return
            time.sleep(0.3)
    raise RuntimeError(f"the service at {url} was not ready after {timeout:.0f} s")


@contextlib.contextmanager
def running_service(
    workdir: Path, env: dict[str, str], serve_args: tuple[str, ...] = (), log_name: str = "serve.log"
) -> Iterator[str]:
    """``lorita serve`` on a free port; yields its URL; stops it (and its worker child) at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (workdir / log_name).open("ab") as log:
        proc = start(lorita("serve", "--port", str(port), *serve_args), env, workdir, log)
        try:
            wait_healthy(url, proc)
            yield url
        finally:
            stop(proc)


def create_key(env: dict[str, str], cwd: Path, tenant: str = "demo") -> str:
    done = subprocess.run(
        lorita("keys", "create", "--tenant", tenant), env=env, cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"lorita keys create failed: {done.stderr.strip()}")
    return done.stdout.strip()


def reloaded_test_accuracy(out_dir: Path, config_path: Path) -> float:
    """Reload the downloaded model and measure it on the config's test split."""
    from core.config import load_config
    from core.data import load_data
    from core.export import load_model
    from core.train import accuracy

    config = load_config(config_path)
    seed = config.train.seed if config.train is not None else 0
    data = load_data(config.dataset, seed=seed)
    return float(accuracy(load_model(out_dir).eval(), data.test))


def run_demo(config_path: Path, workdir: Path) -> int:
    env = service_env(workdir)
    out_dir = workdir / "out"
    print(f"lorita demo: embedded service in {workdir}", file=sys.stderr)
    with running_service(workdir, env) as url:
        key = create_key(env, workdir)
        print(f"lorita demo: service at {url}, API key created", file=sys.stderr)
        done = subprocess.run(
            lorita("submit", str(config_path), "--url", url, "--key", key, "--out", str(out_dir)),
            env=env,
            cwd=workdir,
        )
        if done.returncode != 0:
            print("lorita demo: the job did not succeed (see above)", file=sys.stderr)
            return 1
    report: dict[str, Any] = json.loads((out_dir / "report.json").read_text())
    expected = float(report["accuracy"]["test"]["after"])
    measured = reloaded_test_accuracy(out_dir, config_path)
    if abs(measured - expected) > 1e-6:
        print(
            f"lorita demo: reloaded model.safetensors scores {measured:.6f} on the test split, "
            f"the report says {expected:.6f}",
            file=sys.stderr,
        )
        return 1
    print(
        f"lorita demo: reloaded {out_dir / 'model.safetensors'}: test accuracy {measured:.4f} "
        "matches the report; service stopped",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(EXAMPLE), help="The job config to submit.")
    parser.add_argument("--dir", default=None, help="Work directory (default: a fresh temporary one).")
    args = parser.parse_args(argv)
    if args.dir:
        workdir = Path(args.dir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        return run_demo(Path(args.config).resolve(), workdir)
    with tempfile.TemporaryDirectory(prefix="lorita-demo-") as tmp:
        return run_demo(Path(args.config).resolve(), Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
