"""A TCP proxy on loopback that cuts Redis connections on command.

It sits between redis-py and a redis-server of the test's own and forwards bytes both ways, one
thread per direction per connection. Faults it injects:

* :meth:`Proxy.drop_all`: close every open connection now (a network blip; the next command of each
  client fails and redis-py reconnects).
* :meth:`Proxy.arm` with ``"reply"``: the next command whose bytes contain ``marker`` (e.g.
  ``EVALSHA``) reaches the server and runs there, but its reply is swallowed and the connection
  closed, so the client cannot tell whether it ran (the case redis-py retries, redis-py#3554).
* :meth:`Proxy.arm` with ``"request"``: the next such command is cut in half: the server gets a
  partial command and the connection is closed; nothing runs.

Commands are matched on the raw RESP bytes of one ``recv``; redis-py writes a whole command in one
``sendall`` and the commands the tests arm on are small, so a command never straddles two reads here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

Fault = Literal["reply", "request"]


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    #: Set when this connection's next reply must be swallowed.
    swallow_reply: bool = False
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


@dataclass
class Proxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; see the module docstring."""

    target_port: int
    port: int = 0
    _listener: socket.socket | None = None
    _pairs: list[_Pair] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _armed: list[tuple[Fault, bytes]] = field(default_factory=list)
    #: How many faults fired, by kind.
    fired: dict[str, int] = field(default_factory=lambda: {"reply": 0, "request": 0, "drop_all": 0})
    #: Connections accepted so far.
    accepted: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        self.drop_all(count=False)

    def arm(self, fault: Fault, marker: bytes = b"EVALSHA", times: int = 1) -> None:
        """Inject ``fault`` into the next ``times`` commands containing ``marker`` (any connection)."""
        with self._lock:
            self._armed.extend([(fault, marker)] * times)

    @property
    def armed(self) -> int:
        """Faults armed that have not fired yet."""
        with self._lock:
            return len(self._armed)

    def drop_all(self, count: bool = True) -> int:
        """Close every open connection; return how many were open."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            if count:
                self.fired["drop_all"] += 1
        for pair in pairs:
            pair.close()
        return len(pairs)

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            threading.Thread(target=self._upstream, args=(pair,), daemon=True).start()
            threading.Thread(target=self._downstream, args=(pair,), daemon=True).start()

    def _take(self, data: bytes) -> Fault | None:
        with self._lock:
            for i, (fault, marker) in enumerate(self._armed):
                if marker in data:
                    del self._armed[i]
                    self.fired[fault] += 1
                    return fault
        return None

    def _upstream(self, pair: _Pair) -> None:
        """Client -> server, with the armed faults."""
        try:
            while not pair.closed:
                data = pair.client.recv(65536)
                if not data:
                    break
                fault = self._take(data)
                if fault == "request":
                    pair.server.sendall(data[: len(data) // 2])
                    break
                if fault == "reply":
                    pair.swallow_reply = True
                pair.server.sendall(data)
        except OSError:
            pass
        pair.close()

    def _downstream(self, pair: _Pair) -> None:
        """Server -> client; a swallowed reply closes the connection instead of being delivered."""
        try:
            while not pair.closed:
                data = pair.server.recv(65536)
                if not data:
                    break
                if pair.swallow_reply:
                    break
                pair.client.sendall(data)
        except OSError:
            pass
        pair.close()


@contextlib.contextmanager
def tcp_proxy(target_port: int) -> Iterator[Proxy]:
    """A started :class:`Proxy` to ``target_port``; stopped (every connection closed) on exit."""
    proxy = Proxy(target_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
