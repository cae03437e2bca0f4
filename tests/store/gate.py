"""A TCP forwarder that can be switched off: an outage of whatever sits behind it, with no data lost.

``Gate(upstream_port)`` listens on a free loopback port and pipes each connection to the
upstream. ``down()`` resets every open connection and answers new ones with a reset too (a
client sees the endpoint fail, as during a network or service outage); ``up()`` forwards again.
The upstream (e.g. the moto S3 server) keeps its state throughout.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from tests.store.s3_server import free_port


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        sock.close()


class Gate:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self._open.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._live |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def down(self) -> None:
        self._open.clear()
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            _reset(sock)

    def up(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self.down()
        with contextlib.suppress(OSError):
            self._server.close()
