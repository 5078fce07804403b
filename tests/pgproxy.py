"""A TCP proxy on the loopback in front of PostgreSQL that can lose a commit's reply.

The proxy relays bytes both ways and reads the client's side of PostgreSQL's wire protocol.
Armed with a piece of SQL (:meth:`CommitCutter.arm`), it waits for a transaction that ran a
statement containing it; when the client then sends ``COMMIT``, the proxy forwards it, waits for
the server's answer (so the commit has certainly happened), drops that answer and closes both
sockets. The client sees its connection die during the commit, as when a network or a server's
host fails at the worst moment. New connections are relayed as before.

Cut off (:meth:`CommitCutter.cut`), the proxy closes every connection and refuses new ones until
:meth:`CommitCutter.restore`: its clients lose the server while others still reach it.

psycopg2 speaks the simple query protocol (``Q`` messages: ``BEGIN``, each statement with its
parameters inlined, ``COMMIT``); the URL must say ``sslmode=disable`` so that the bytes can be read.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator

_SSL_OR_GSS_REQUEST = (80877103, 80877104)


class _Conn:
    """One client connection: the client's bytes are read message by message, the server's are
    relayed as they come."""

    def __init__(self, proxy: CommitCutter, client: socket.socket, server: socket.socket) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.pending = b""
        self.untyped = 1  # the startup message (and an SSL/GSS request before it) has no type
        self.statements: list[str] = []

    def run(self) -> None:
        with self.client, self.server:
            while True:
                ready, _, _ = select.select([self.client, self.server], [], [], 0.5)
                if self.proxy.closed or self.proxy.down:
                    return
                if self.server in ready:
                    data = self.server.recv(65536)
                    if not data:
                        return
                    self.client.sendall(data)
                if self.client in ready:
                    data = self.client.recv(65536)
                    if not data:
                        return
                    self.pending += data
                    if not self._relay_messages():
                        return

    def _relay_messages(self) -> bool:
        """Forward every whole message in ``pending``; False once the connection was cut."""
        while True:
            head = 4 if self.untyped else 5
            if len(self.pending) < head:
                return True
            if self.untyped:
                (length,) = struct.unpack("!i", self.pending[:4])
                size, kind = length, b""
            else:
                kind = self.pending[:1]
                size = 1 + struct.unpack("!i", self.pending[1:5])[0]
            if len(self.pending) < size:
                return True
            message, self.pending = self.pending[:size], self.pending[size:]
            if self.untyped:
                (code,) = struct.unpack("!i", message[4:8])
                self.untyped = 1 if code in _SSL_OR_GSS_REQUEST else 0
            self.server.sendall(message)
            if kind == b"Q" and not self._after_query(message[5:].rstrip(b"\0").decode()):
                return False

    def _after_query(self, sql: str) -> bool:
        """Note a query that was just forwarded; cut after a commit the proxy is armed for."""
        word = sql.strip().split(None, 1)[0].upper() if sql.strip() else ""
        if word in ("BEGIN", "ROLLBACK"):
            self.statements = []
            return True
        if word != "COMMIT":
            self.statements.append(sql)
            return True
        ran, self.statements = self.statements, []
        if not self.proxy.take(ran):
            return True
        self._swallow_reply()
        return False

    def _swallow_reply(self) -> None:
        """Read the server's answer to the commit up to ReadyForQuery, and drop it."""
        self.server.settimeout(10)
        got = b""
        while b"Z\0\0\0\x05" not in got:
            data = self.server.recv(65536)
            if not data:
                break
            got += data
        self.proxy.swallowed.append(got)


class CommitCutter:
    """The proxy: listens on ``127.0.0.1:port`` and relays to ``127.0.0.1:upstream``."""

    def __init__(self, upstream: int = 5432) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.down = False  # cut off: connections closed, new ones refused
        self.cuts: list[list[str]] = []  # the statements of each transaction whose reply was cut
        self.swallowed: list[bytes] = []  # the server's dropped answers
        self._lock = threading.Lock()
        self._armed: list[str] = []
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True, name="pgproxy")
        accept.start()
        self._threads.append(accept)

    def arm(self, sql: str, times: int = 1) -> None:
        """Cut the reply to the next ``times`` commits of transactions that ran ``sql``."""
        with self._lock:
            self._armed += [sql] * times

    def take(self, statements: list[str]) -> bool:
        """Whether the commit of a transaction that ran ``statements`` is to be cut (and if so,
        one fewer is)."""
        with self._lock:
            for i, sql in enumerate(self._armed):
                if any(sql in s for s in statements):
                    del self._armed[i]
                    self.cuts.append(statements)
                    return True
        return False

    def cut(self) -> None:
        """Close every connection (within half a second) and refuse new ones."""
        self.down = True

    def restore(self) -> None:
        """Relay new connections again."""
        self.down = False

    def _accept(self) -> None:
        self.listener.settimeout(0.5)
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                if self.down:
                    raise ConnectionRefusedError
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # cut off, or the server is down: the client sees it closed
                client.close()
                continue
            conn = _Conn(self, client, server)
            thread = threading.Thread(target=conn.run, daemon=True, name="pgproxy-conn")
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


@contextlib.contextmanager
def commit_cutter(upstream: int = 5432) -> Iterator[CommitCutter]:
    proxy = CommitCutter(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
