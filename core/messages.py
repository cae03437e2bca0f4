"""Messages for people: what a job's user reads when it fails.

A user reads about *their* input and what to change, never this machine's internals: no absolute
paths (they name tenants, ids and the operator's layout), no exception class names, no library
text. ``user_message`` cleans the message of an error a person can fix (``ConfigError``,
``DataError``...); ``failure_message`` turns an unexpected one into a sentence with a reference
the operator finds in the log.
"""

from __future__ import annotations

import errno
import re
import uuid

# an absolute POSIX path of two or more parts (quotes, spaces and commas end it); the whole path
# is replaced by its last part, the file name the user knows. The service's own URLs
# (/v1/models, /ui/...) are advice, not paths: kept.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])(?:~|/(?!v1/|ui/|docs))(?:[\w.@+-]+/)+([\w.@+-]+)/?")
# a file:// or similar URL with a local path
_FILE_URL = re.compile(r"file://\S+/([\w.@+-]+)")
MAX_MESSAGE_CHARS = 1000


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its file name (``/srv/var/tenants/t1/datasets/d9/
    data.npz`` -> ``data.npz``), and cut to a readable length."""
    text = _FILE_URL.sub(r"\1", text)
    text = _ABSOLUTE_PATH.sub(r"\1", text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3].rstrip() + "..."
    return text


def user_message(err: BaseException) -> str:
    """The message of an error a person can fix, without this machine's paths."""
    return scrub_paths(str(err).strip() or "the job's input is not valid")


def new_reference() -> str:
    """A short id tying a user's failure message to the worker's log line."""
    return uuid.uuid4().hex[:12]


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def failure_message(err: BaseException, reference: str) -> str:
    """What a user reads when their job failed for a reason that is not their input's: what
    happened in their terms, what they can try, and a reference for the operator."""
    if _is_out_of_memory(err):
        return (
            "the job ran out of memory; lower train.batch_size, use a smaller model (model.options) "
            "or less data, and submit it again"
        )
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "no space left on the artifact store; the operator must free space before the job can run"
    return (
        "the job failed because of a problem on the server, not in its config; submit it again, "
        f"and if it fails again give the operator this reference: {reference}"
    )
