"""Real servers for tests: redis-server and rabbitmq-server processes started in temp dirs on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
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


def rabbitmq_scripts() -> tuple[str, str]:
    """Paths of ``rabbitmq-server`` and ``rabbitmqctl``, run as the current user.

    Debian's ``/usr/sbin`` entries are a wrapper that re-runs them as the ``rabbitmq`` user (with
    that user's home and cookie); the scripts under ``/usr/lib/rabbitmq/bin`` are the real ones.
    Fails loudly (``.ci/run`` installs the package) rather than skipping.
    """
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists() and (debian / "rabbitmqctl").exists():
        return str(debian / "rabbitmq-server"), str(debian / "rabbitmqctl")
    server, ctl = shutil.which("rabbitmq-server"), shutil.which("rabbitmqctl")
    if not server or not ctl:
        raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server; .ci/run does this)")
    return server, ctl


def epmd_binary() -> str:
    """Path of Erlang's ``epmd`` (it comes with rabbitmq-server's Erlang)."""
    found = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)
    if not found:
        raise RuntimeError("epmd is not installed (it comes with Erlang, a dependency of rabbitmq-server)")
    return str(found)


def _session_pids(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (zombies left out: they are only waiting to be reaped)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


@dataclass
class RabbitMQProcess:
    """One RabbitMQ node of the tests' own, on loopback, never the machine's.

    Everything it uses is its own: node name, AMQP port, Erlang distribution port, an ``epmd`` on a
    port of its own (``ERL_EPMD_PORT``; the machine's epmd on 4369 is never asked), data, logs,
    config, plugins (none) and ``HOME`` (the Erlang cookie). The broker and the epmd each run in a
    session of their own, so stopping kills whatever of theirs is left.

    Args:
        directory: Where its files go (a fresh temp dir).
    """

    directory: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    nodename: str = field(default_factory=lambda: f"rabbit-{uuid.uuid4().hex[:10]}@localhost")
    process: subprocess.Popen[bytes] | None = None
    epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def env(self) -> dict[str, str]:
        """The environment of its server and of ``rabbitmqctl`` for it (nothing inherited of RabbitMQ or Erlang)."""
        d = self.directory
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        dist = "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false"
        return {
            **base,
            "HOME": str(d),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": dist,
            "RABBITMQ_CTL_ERL_ARGS": dist,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Names from /etc/hosts only: no native resolver helper (inet_gethost) to outlive the VM.
            "ERL_INETRC": str(d / "erl_inetrc"),
        }

    def start(self, timeout_s: float = 60.0) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "disk_free_limit.absolute = 10MB\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (d / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq/rabbitmq-env.conf
        (d / "advanced.config").write_text("[].\n")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "erl_inetrc").write_text('{host, {127,0,0,1}, ["localhost"]}.\n{lookup, [file]}.\n')
        env = self.env
        with (d / "epmd.out").open("ab") as out:
            self.epmd = subprocess.Popen(
                [epmd_binary(), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=env, cwd=d, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        with (d / "server.out").open("ab") as out:
            self.process = subprocess.Popen(
                [rabbitmq_scripts()[0]], env=env, cwd=d, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _tail(self) -> str:
        texts = []
        for path in [self.directory / "server.out", *sorted((self.directory / "log").glob("*.log"))]:
            if path.exists():
                texts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(texts)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until ``url`` completes an AMQP handshake (the node is up and its listener open)."""
        from kombu.connection import Connection

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}:\n{self._tail()}")
            try:
                with Connection(self.url, connect_timeout=1) as conn:  # type: ignore[no-untyped-call]
                    conn.connect()
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rabbitmq-server not ready after {timeout_s} s:\n{self._tail()}") from None
                time.sleep(0.2)

    def ctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node> *args`` for this node."""
        return subprocess.run(
            [rabbitmq_scripts()[1], "-n", self.nodename, *args],
            env=self.env, cwd=self.directory, capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip

    def stop(self) -> None:
        """``rabbitmqctl stop``, then SIGKILL whatever of the node and its epmd is left."""
        if self.process is not None:
            if self.process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.ctl("stop", timeout_s=30)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=15)
            self._kill_session(self.process)
            self.process = None
        if self.epmd is not None:
            self._kill_session(self.epmd)
            self.epmd = None

    @staticmethod
    def _kill_session(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL every live process of ``proc``'s session (it leads one) and reap ``proc``."""
        for _ in range(50):
            pids = _session_pids(proc.pid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


@contextlib.contextmanager
def rabbitmq_process(directory: Path) -> Iterator[RabbitMQProcess]:
    """Start a RabbitMQ node of the tests' own in ``directory``; stop it on exit."""
    server = RabbitMQProcess(directory=directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
