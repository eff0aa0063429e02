"""Real servers for tests: redis-server processes started in temp dirs on free loopback ports."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port P on 127.0.0.1 whose cluster bus port (P + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            port = random.randrange(20000, 30000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair (P, P + 10000) for a cluster node")


def redis_server_binary() -> str:
    """Path of ``redis-server``; fails loudly (``.ci/run`` installs it) rather than skipping."""
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does this)")
    return found


@dataclass
class RedisProcess:
    """One redis-server of the tests' own. ``stop()``/``start()`` simulate an outage or restart."""

    directory: Path
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    #: Set: the server requires it (``--requirepass``) and ``url`` carries it.
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "redis.log"),
            *(("--requirepass", self.password) if self.password else ()),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        while True:
            if self.process is not None and self.process.poll() is not None:
                log = self.directory / "redis.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.process.returncode}: {tail}")
            try:
                if client.ping():
                    client.close()
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@contextlib.contextmanager
def redis_process(directory: Path, *extra: str) -> Iterator[RedisProcess]:
    """Start a redis-server in ``directory``; stop it on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisProcess(directory=directory, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def redis_cli_binary() -> str:
    """Path of ``redis-cli`` (shipped with redis-server); fails loudly rather than skipping."""
    found = shutil.which("redis-cli")
    if not found:
        raise RuntimeError("redis-cli is not installed (it comes with redis-server; .ci/run installs it)")
    return found


@dataclass
class RedisClusterProcesses:
    """A Redis Cluster of the tests' own: ``masters`` redis-servers on loopback, no replicas."""

    directory: Path
    masters: int = 3
    #: Set: every node requires it, and ``url`` carries it.
    password: str | None = None
    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL of one node; a cluster client discovers the others from it."""
        return self.nodes[0].url

    def start(self) -> None:
        for i in range(self.masters):
            node_dir = self.directory / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            node = RedisProcess(
                directory=node_dir,
                port=free_cluster_port(),
                password=self.password,
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--appendonly", "no"),
            )
            self.nodes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        auth = ("-a", self.password, "--no-auth-warning") if self.password else ()
        subprocess.run(
            [redis_cli_binary(), *auth, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        """Wait until every node reports ``cluster_state:ok`` and knows every other node."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            client = redis.Redis(port=node.port, password=self.password, socket_connect_timeout=0.5)
            try:
                while True:
                    info = client.cluster("INFO")
                    if info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == self.masters:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster not ready on port {node.port}: {info}")
                    time.sleep(0.1)
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def redis_cluster(directory: Path, masters: int = 3, password: str | None = None) -> Iterator[RedisClusterProcesses]:
    """Start a ``masters``-node Redis Cluster in ``directory`` (one sub-directory per node); stop it on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    cluster = RedisClusterProcesses(directory=directory, masters=masters, password=password)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class LossyProxy:
    """A TCP proxy to a local server that can lose a reply, as a network cut would.

    Armed with :meth:`lose_next_reply`, it forwards the client's next request, then closes the
    client's connection when the answer comes back instead of relaying it: the server did the
    work, the client saw a dropped connection (and redis-py retries the command).

    Args:
        target_port: The server's port on 127.0.0.1.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._armed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        #: How many replies were lost so far.
        self.replies_lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_next_reply(self) -> None:
        """Drop the connection that receives the next reply, instead of relaying it."""
        self._armed.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self._armed.is_set():
                    self._armed.clear()
                    self.replies_lost += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
