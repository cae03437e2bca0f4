"""The embedded broker (worker.fs_broker): whole messages only, and an unreadable one never kills a consumer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from kombu import Connection

from store.settings import Settings
from worker import fs_broker
from worker.celery_app import _filesystem_transport_options, create_celery_app


def _connection(root: Path) -> Connection:
    return Connection(f"{fs_broker.ALIAS}://", transport_options=_filesystem_transport_options(root))


# kombu keeps the filesystem transport's exchange bindings in one process-wide table: each test
# uses its own queue name so that a queue bound to another test's folder is never looked up


def test_a_message_goes_through_and_leaves_no_partial_file(tmp_path: Path) -> None:
    with _connection(tmp_path) as conn:
        queue = conn.SimpleQueue("q1")
        queue.put({"job_id": "abc"})
        names = [p.name for p in (tmp_path / "queue").iterdir()]
        assert len(names) == 1 and names[0].endswith(".q1.msg") and not names[0].startswith(".")
        assert queue.get(timeout=2).payload == {"job_id": "abc"}
        queue.close()


def test_a_message_being_written_is_not_seen_and_an_empty_one_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "queue"
    with _connection(tmp_path) as conn:
        queue = conn.SimpleQueue("q2")
        # where fs_broker writes a message before its rename: consumers skip it
        (folder / ".1_x.q2.msg.tmp").write_bytes(b"")
        # what kombu's own transport leaves between creating a file and writing it (sorted first);
        # reading it killed the embedded worker with a JSONDecodeError ("Unrecoverable error")
        (folder / "0_empty.q2.msg").write_bytes(b"")
        queue.put({"job_id": "next"})
        with caplog.at_level(logging.WARNING, logger="worker.fs_broker"):
            assert queue.get(timeout=2).payload == {"job_id": "next"}
        assert any("dropped an unreadable message" in r.getMessage() for r in caplog.records)
        assert (folder / ".1_x.q2.msg.tmp").exists()  # not consumed
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.3)
        queue.close()


def test_the_embedded_app_uses_it(tmp_path: Path) -> None:
    app = create_celery_app(Settings(broker_dir=str(tmp_path / "broker"), var_dir=str(tmp_path)))
    assert app.conf.broker_url == f"{fs_broker.ALIAS}://"
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, fs_broker.Transport)
        app.send_task("lorita.run_job", args=["job-1"], queue="q3", connection=conn)
    (msg,) = (tmp_path / "broker" / "queue").glob("*.q3.msg")
    assert json.loads(msg.read_text())["headers"]["argsrepr"] == "['job-1']"
