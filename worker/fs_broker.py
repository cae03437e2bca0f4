"""kombu's ``filesystem://`` transport, with messages published atomically.

kombu's own ``Channel._put`` creates the message file in the queue folder and then writes it.
A consumer polling that folder can move and read the file in between, get zero bytes, and
die on the ``JSONDecodeError`` ("Unrecoverable error"). The embedded worker did so under load.
Here a message is written under a name no consumer picks up (a leading dot, ``.tmp`` at the
end) and renamed into place once complete; ``rename`` within one folder is atomic, so a
consumer sees the whole message or nothing. A message that still cannot be decoded (say, one
written by an older version) is dropped with a warning instead of killing the worker: the
database holds every job, and the sweeper re-sends the ids of queued jobs that wait too long.

Registered as the transport alias ``lorita-fs`` (``worker.celery_app`` uses it for the embedded
mode); API and worker processes both import that module, so both resolve the alias.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

ALIAS = "lorita-fs"


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.tmp")  # never matches '<queue>.msg'
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add a message for queue {queue!r}") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        while True:
            try:
                return super()._get(queue)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                # kombu already removed the file; skip it and look for the next message
                log.warning("dropped an unreadable message on queue %s (%s)", queue, err)


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")
