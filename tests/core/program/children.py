"""Stand-ins for the loader's child process (imported by spawned children: keep it light)."""

from __future__ import annotations

import os
import time
from typing import Any


def crash(path: str, display: str, conn: Any) -> None:
    os._exit(3)  # like a segfault: no message sent


def hang(path: str, display: str, conn: Any) -> None:
    time.sleep(600)
