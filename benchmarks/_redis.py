"""Private redis-servers for the benchmarks: each on a free loopback port, in a temp dir, no persistence.

The benchmarks never touch a shared Redis: a private server keeps INFO commandstats and MEMORY
USAGE free of other clients' traffic.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

#: Commands a client sends for its own upkeep (connecting, health checks) or that the benchmark
#: itself sends to read statistics: never counted as the tracker's.
HOUSEKEEPING = ("info", "config", "client", "hello", "ping", "select", "auth", "memory", "dbsize", "flushall")


def redis_version() -> str:
    """``redis-server --version``'s version number ("" when not installed)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return ""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """One running redis-server of the benchmark's own."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A fresh client (bytes replies)."""
        return redis.Redis(port=self.port)

    def commandstats(self) -> dict[str, dict[str, Any]]:
        """``INFO commandstats`` by command (sub-commands as ``config|resetstat``), since the last reset."""
        client = self.client()
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return {name.removeprefix("cmdstat_"): value for name, value in stats.items()}

    def command_calls(self) -> dict[str, int]:
        """``INFO commandstats`` as {command: calls}."""
        return {name: int(value["calls"]) for name, value in self.commandstats().items()}

    def reset_stats(self) -> None:
        client = self.client()
        try:
            client.config_resetstat()
        finally:
            client.close()


def _start(directory: Path, extra: tuple[str, ...]) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    args = [
        binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
        "--appendonly", "no", "--daemonize", "no", "--logfile", str(directory / "redis.log"), *extra,
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10.0
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}; see {directory / 'redis.log'}")
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()
    return RedisServer(port=port, directory=directory, process=process)


@contextlib.contextmanager
def redis_server(*extra: str) -> Iterator[RedisServer]:
    """Start a private redis-server (extra arguments passed on); stop it and remove its dir on exit."""
    with tempfile.TemporaryDirectory(prefix="tracker-bench-") as tmp:
        server = _start(Path(tmp), extra)
        try:
            yield server
        finally:
            server.process.terminate()
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


@dataclass(frozen=True)
class LoggedCommand:
    """One command the server ran, from its slow log."""

    name: str
    #: The command's first argument (its key, for most commands).
    key: str
    #: ``CLIENT SETNAME`` of the sender ("" when unnamed).
    client_name: str
    #: Run by a Lua script (the slow log shows the script's fake client, ``?:0``), not sent by a client.
    in_script: bool


@contextlib.contextmanager
def command_log(server: RedisServer, max_len: int = 1_000_000) -> Iterator[list[LoggedCommand]]:
    """Log every command ``server`` runs while the block runs (SLOWLOG with a 0 µs threshold).

    Unlike INFO commandstats, the slow log tells a round trip (a command a client sent) from a
    command a Lua script ran: the latter carry the script's fake client address ``?:0``.
    Housekeeping commands (see :data:`HOUSEKEEPING`) are left out. The list yielded is filled
    when the block exits.
    """
    client = server.client()
    logged: list[LoggedCommand] = []
    try:
        client.config_set("slowlog-max-len", max_len)
        client.slowlog_reset()
        client.config_set("slowlog-log-slower-than", 0)
        yield logged
        client.config_set("slowlog-log-slower-than", 10_000)
        entries: list[Any] = client.execute_command("SLOWLOG", "GET", -1)  # type: ignore[no-untyped-call]
        for entry in entries:
            if isinstance(entry, dict):  # parsed by a redis-py response callback
                args = _str(entry["command"]).split(" ")
                address, name = entry.get("client_address", ""), entry.get("client_name", "")
            else:  # [id, time, duration, args, address, name]
                args, address, name = [_str(a) for a in entry[3]], entry[4], entry[5]
            command = args[0].lower()
            if command in HOUSEKEEPING or command == "slowlog":
                continue
            key = args[1] if len(args) > 1 else ""
            logged.append(LoggedCommand(command, key, _str(name), in_script=_str(address) == "?:0"))
        client.slowlog_reset()
    finally:
        client.close()


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
