"""Operating points through the embedded service: ``lorita submit`` follows the job's event
stream, ``lorita select --job`` runs a derived job there, and its figures equal ``lorita select``
on the job's own files."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from cli.demo import create_key, lorita, running_service, service_env
from tests.worker.conftest import parent_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = parent_config()
SELECT = ("--params", "0.4", "--max-evals", "8", "--quiet")


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(lorita(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_select_through_the_service_agrees_with_select_on_the_jobs_files(tmp_path: Path) -> None:
    env = service_env(tmp_path, OMP_NUM_THREADS="1")
    config = tmp_path / "job.json"
    config.write_text(json.dumps(CONFIG))
    with running_service(tmp_path, env) as url:
        key = create_key(env, tmp_path)
        service = ("--url", url, "--key", key)
        submitted = run(
            "submit", str(config), *service, "--out", str(tmp_path / "job"), "--quiet", env=env, cwd=tmp_path
        )
        match = re.search(r"job ([0-9a-f]{32}) ", submitted.stderr)
        assert match, submitted.stderr
        job_id = match.group(1)
        remote = run(
            "select",
            "--job",
            job_id,
            *SELECT,
            *service,
            "--out",
            str(tmp_path / "remote"),
            env=env,
            cwd=tmp_path,
        )
        # exactly one point of the job's Pareto curve: a compressed one the job did not choose
        parent = json.loads((tmp_path / "job" / "report.json").read_text())
        index = next(
            i
            for i, p in enumerate(parent["pareto"])
            if i > 0 and not p["chosen"] and p["params_fraction"] < 1
        )
        point = ("--point", str(index), "--quiet")
        remote_point = run(
            "select", "--job", job_id, *point, *service, "--out", str(tmp_path / "rp"), env=env, cwd=tmp_path
        )
    log = (tmp_path / "serve.log").read_text()
    assert f"/v1/jobs/{job_id}/stream" in log  # submit followed the stream, not only polls

    # the job's own files on the server: its report and the dense model it kept
    parent_dir = next((tmp_path / "var" / "artifacts").glob(f"**/{job_id}/a1"))
    assert (parent_dir / "dense" / "model.safetensors").is_file()
    local = run("select", str(parent_dir), *SELECT, "--out", str(tmp_path / "local"), env=env, cwd=tmp_path)
    print("lorita select --job (service):\n" + remote.stdout)
    print("lorita select DIR (local):\n" + local.stdout)

    served = json.loads((tmp_path / "remote" / "report.json").read_text())
    mine = json.loads((tmp_path / "local" / "report.json").read_text())
    for key_ in ("params", "flops", "accuracy", "ranks", "pareto"):
        assert served[key_] == mine[key_], key_
    assert served["selected_from"] == f"job {job_id}"
    assert served["params"]["after"] <= 0.4 * served["params"]["before"]
    assert remote.stdout == local.stdout  # the same table and chosen point

    # --point N: the derived job, and select on the files, build exactly the job's point N
    local_point = run("select", str(parent_dir), *point, "--out", str(tmp_path / "lp"), env=env, cwd=tmp_path)
    clicked = parent["pareto"][index]
    figures = ("params", "flops", "val_accuracy", "ranks")
    for out in ("rp", "lp"):
        chosen = next(
            p for p in json.loads((tmp_path / out / "report.json").read_text())["pareto"] if p["chosen"]
        )
        assert {k: chosen[k] for k in figures} == {k: clicked[k] for k in figures}, out
    assert remote_point.stdout == local_point.stdout
    print(f"point {index}: " + ", ".join(f"{k}={clicked[k]}" for k in figures[:3]))
