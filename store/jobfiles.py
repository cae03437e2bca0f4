"""The files of one run of a job, on either artifact store, and what happens to them at its end.

Layout under the job's key ``tenants/<tid>/jobs/<jid>``:

* ``work/`` the training checkpoint, shared by the attempts (a rerun resumes from it);
* ``a<N>/`` the outputs of attempt N; only the attempt that succeeded is recorded.

On a local store the run writes straight into the store's folders. On S3 the run writes to a
local workspace (``LORITA_WORK_DIR``); the checkpoint is uploaded after each epoch, so a rerun on
another machine resumes from it, and the outputs are uploaded once the run has finished.

Ends (see :meth:`JobFiles.finish`): a success keeps only its own ``a<N>/``; a failure or a cancel
leaves nothing; a superseded run removes only its own ``a<N>/`` (the newer run owns ``work/``).
A full disk is reported with :data:`store.artifacts.NO_SPACE_MESSAGE` and the partial files
(``*.tmp``, ``*.part``) are removed so that the space is given back.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from store.artifacts import (
    ArtifactStore,
    ArtifactStoreError,
    LocalArtifactStore,
    is_no_space,
    job_key,
    sha256_file,
)

log = logging.getLogger(__name__)

WORK = "work"
CHECKPOINT = "checkpoint.pt"
PARTIAL_SUFFIXES = (".tmp", ".part")
LOW_SPACE_BYTES = 16 * 1024 * 1024


def attempt_folder(attempt: int) -> str:
    return f"a{attempt}"


class JobFiles:
    def __init__(self, store: ArtifactStore, tenant_id: str, job_id: str, attempt: int) -> None:
        self.store = store
        self.base = job_key(tenant_id, job_id)
        self.attempt = attempt
        self.prefix = f"{self.base}/{attempt_folder(attempt)}"
        self.out_dir = store.workspace(self.prefix)
        self.work_dir = store.workspace(f"{self.base}/{WORK}")
        self._remote = not isinstance(store, LocalArtifactStore)
        self._synced_mtime: float | None = None

    @property
    def checkpoint_key(self) -> str:
        return f"{self.base}/{WORK}/{CHECKPOINT}"

    def prepare(self) -> tuple[Path, Path]:
        """Fresh ``out_dir`` (leftovers of a crash of this very attempt removed) and ``work_dir``
        (with the stored checkpoint where this machine has none); returns both."""
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.out_dir.mkdir(parents=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        local_ckpt = self.work_dir / CHECKPOINT
        if self._remote and not local_ckpt.exists() and self.store.size(self.checkpoint_key) is not None:
            got = self.store.local_path(self.checkpoint_key)  # a cached download
            shutil.move(str(got), local_ckpt)
            self._synced_mtime = local_ckpt.stat().st_mtime
            log.info("restored the checkpoint of %s from the artifact store", self.base)
        return self.out_dir, self.work_dir

    def sync_checkpoint(self) -> bool:
        """Upload the checkpoint if it changed since the last upload (S3 only); True if uploaded.

        Called at each new epoch; a failed upload is logged and retried at the next one (the run
        itself goes on: only a rerun on another machine needs the stored copy)."""
        if not self._remote:
            return False
        ckpt = self.work_dir / CHECKPOINT
        try:
            mtime = ckpt.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self._synced_mtime:
            return False
        try:
            self.store.put_file(self.checkpoint_key, ckpt)
        except (ArtifactStoreError, OSError) as err:
            log.warning("could not upload the checkpoint of %s: %s", self.base, err)
            return False
        self._synced_mtime = mtime
        return True

    def collect(self) -> list[tuple[str, int, str, str]]:
        """Every file of ``out_dir`` as (name, size, sha256, location), stored under ``prefix``."""
        artifacts = []
        for path in sorted(self.out_dir.iterdir()):
            if not path.is_file():
                continue
            key = f"{self.prefix}/{path.name}"
            if self._remote:
                size, sha256 = self.store.put_file(key, path)
            else:  # the run wrote straight into the store
                size, sha256 = sha256_file(path)
            artifacts.append((path.name, int(size), sha256, key))
        return artifacts

    def out_of_space(self, err: BaseException) -> bool:
        """Did ``err`` come from a full disk? torch.save reports ENOSPC as an iostream error with no
        errno, so a failure is also put down to the disk when its filesystem has (almost) no space
        left at that moment (before the partial files are removed)."""
        if is_no_space(err):
            return True
        for folder in (self.work_dir, self.out_dir):
            try:
                if folder.exists() and shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
                    return True
            except OSError:
                continue
        return False

    def remove_partials(self) -> None:
        """Half-written files (a checkpoint cut short by a full disk): give their space back."""
        for folder in (self.work_dir, self.out_dir):
            if folder.is_dir():
                for path in folder.rglob("*"):
                    if path.is_file() and (path.suffix in PARTIAL_SUFFIXES or ".tmp" in path.name):
                        path.unlink(missing_ok=True)

    def finish(self, outcome: str) -> None:
        """Clean up after the run ended with ``outcome``. Never raises: a leftover is logged and
        the housekeeping sweep (``store.housekeeping``) removes it later."""
        try:
            if outcome == "succeeded":
                self._keep_only_own_attempt()
            elif outcome in ("failed", "canceled"):
                self.store.delete_prefix(self.base)
            elif outcome == "stale":
                self.store.delete_prefix(self.prefix)
            if self._remote:
                # the local workspace of this run; a stale run leaves work/ to the newer one
                shutil.rmtree(self.out_dir, ignore_errors=True)
                if outcome != "stale":
                    shutil.rmtree(self.work_dir, ignore_errors=True)
        except (ArtifactStoreError, OSError) as err:
            log.warning("could not clean up the files of %s after it %s: %s", self.base, outcome, err)

    def _keep_only_own_attempt(self) -> None:
        own = attempt_folder(self.attempt)
        for name in self.store.list_children(self.base):
            if name != own:
                self.store.delete_prefix(f"{self.base}/{name}")
