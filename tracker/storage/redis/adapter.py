"""The Redis adapter: drives the programs of :mod:`tracker.storage.redis.programs` with a
blocking redis-py client (:class:`RedisStorageAdapter`, Celery workers) or with ``redis.asyncio``
clients, one per event loop (:class:`AsyncRedisStore`: web apps, scripts, tests).

The scripts are registered once per client with ``register_script``, which falls back from
EVALSHA to loading the script when the server answers NOSCRIPT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

import redis
from redis.cluster import RedisCluster

from tracker import errors
from tracker.config import TrackerSettings
from tracker.storage.base import StoreCall
from tracker.storage.keys import KeySpace
from tracker.storage.redis import clients
from tracker.storage.redis.programs import SCRIPTS, Command, Program, RedisPrograms, Script, script_source

T = TypeVar("T")
P = ParamSpec("P")


def _unavailable(exc: redis.RedisError, url: str | None) -> errors.StorageUnavailableError:
    """The tracker's error for one of redis-py's."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return errors.StorageUnavailableError(f"Redis is unreachable ({exc}); is redis-server running?", url)
    return errors.StorageUnavailableError(f"Redis refused the command ({exc})", url)


def _register_scripts(client: Any) -> dict[str, Any]:
    """Every script, registered on ``client`` (its SHA computed once, loaded on the first NOSCRIPT)."""
    return {name: client.register_script(script_source(name)) for name in SCRIPTS}


def _has_script(batch: list[Command]) -> bool:
    return any(isinstance(command, Script) for command in batch)


def _queue(command: Command, target: Any, scripts: dict[str, Any]) -> Any:
    """Send ``command`` through ``target`` (a client, or a pipeline that queues it)."""
    if isinstance(command, Script):
        return scripts[command.name](keys=command.keys, args=command.args, client=target)
    name, *args = command
    if name == "ZADD":
        return target.zadd(args[0], args[1])
    return target.execute_command(name, *args)


class _Driven(Generic[P, T]):
    """A verb of the blocking adapter: the program of the same name, driven to its end. The
    method is made once per adapter, on first use, and kept in its ``__dict__``."""

    def __init__(self, program: Callable[Concatenate[RedisPrograms, P], Program[T]]) -> None:
        self.program = program
        self.__doc__ = program.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, adapter: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(self, adapter: RedisStorageAdapter, owner: type[Any]) -> Callable[P, T]: ...

    def __get__(self, adapter: RedisStorageAdapter | None, owner: type[Any]) -> Any:
        if adapter is None:
            return self
        program = self.program

        def verb(*args: P.args, **kwargs: P.kwargs) -> T:
            return adapter.run(program(adapter.programs, *args, **kwargs))

        verb.__name__ = verb.__qualname__ = self.name
        adapter.__dict__[self.name] = verb
        return verb


class RedisStorageAdapter:
    """Sessions in Redis, shared by every worker, beat and web app. Blocking flavour.

    Args:
        client: A ``redis.Redis`` or ``redis.cluster.RedisCluster``. Safe to share between
            threads; create one per process (after fork).
        key_prefix: First part of every key.
        ttl_s: TTL of a session's keys, refreshed on every write (use the session timeout).
        finished_ttl_s: TTL of an ended session's keys (use ``TRACKER_FINISHED_TTL_S``).
        events_maxlen: Approximate cap of each session's event stream.
        url: The server's URL (for error messages, and the asyncio flavour's clients).
        settings: Timeouts and retries of the asyncio flavour's clients.
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "tracker",
        ttl_s: float = 1800.0,
        finished_ttl_s: float = 86400.0,
        events_maxlen: int = 1000,
        url: str | None = None,
        settings: TrackerSettings | None = None,
    ) -> None:
        self.url = url
        self._settings = settings or TrackerSettings()
        # Rounded up: a key's TTL must never end a session before its timeout (2.4 s -> 3 s, not 2 s).
        ttl, ended_ttl = max(1, math.ceil(ttl_s)), max(1, math.ceil(finished_ttl_s))
        cluster = isinstance(client, RedisCluster)
        self.programs = RedisPrograms(KeySpace(key_prefix), ttl, events_maxlen, cluster, ended_ttl)
        self._client = client
        self._scripts = _register_scripts(client)

    @property
    def client(self) -> Any:
        """The redis-py client in use."""
        return self._client

    @classmethod
    def from_url(cls, url: str, settings: TrackerSettings | None = None) -> RedisStorageAdapter:
        """Connect to ``url`` with retries, timeouts and health checks from ``settings``."""
        settings = settings or TrackerSettings()
        return cls(
            clients.connect(settings, url=url, cluster=settings.redis_cluster),
            key_prefix=settings.key_prefix,
            ttl_s=settings.session_timeout_s,
            finished_ttl_s=settings.finished_ttl_s,
            events_maxlen=settings.events_maxlen,
            url=url,
            settings=settings,
        )

    @classmethod
    def from_settings(cls, settings: TrackerSettings) -> RedisStorageAdapter:
        """Connect to ``settings.redis_url``."""
        if not settings.redis_url:
            raise errors.StorageUnavailableError("TRACKER_REDIS_URL is not set")
        return cls.from_url(settings.redis_url, settings)

    def _execute(self, batch: list[Command]) -> list[Any]:
        client, scripts = self._client, self._scripts
        if len(batch) == 1:
            return [_queue(batch[0], client, scripts)]
        if self.programs.cluster and _has_script(batch):
            # A cluster pipeline does not load a script the server lacks (NOSCRIPT): scripts go one by one.
            return [_queue(command, client, scripts) for command in batch]
        # Outside Cluster one round trip; on a Cluster one per node (redis-py splits by slot).
        pipe = client.pipeline(transaction=False)
        for command in batch:
            _queue(command, pipe, scripts)
        return list(pipe.execute())

    def run(self, program: Program[T]) -> T:
        """Drive one program to its end, one round trip per batch it yields."""
        replies: list[Any] | None = None
        try:
            while True:
                replies = self._execute(program.send(replies))  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except redis.RedisError as exc:
            raise _unavailable(exc, self.url) from exc

    # -- the verbs of SessionStorageAdapter, each the program of its name, driven -----------------

    create = _Driven(RedisPrograms.create)
    add_nodes = _Driven(RedisPrograms.add_nodes)
    get = _Driven(RedisPrograms.get)
    get_structure = _Driven(RedisPrograms.get_structure)
    transition = _Driven(RedisPrograms.transition)
    resume = _Driven(RedisPrograms.resume)
    set_progress = _Driven(RedisPrograms.set_progress)
    record_node = _Driven(RedisPrograms.record_node)
    record_nodes = _Driven(RedisPrograms.record_nodes)
    heartbeat = _Driven(RedisPrograms.heartbeat)
    retire = _Driven(RedisPrograms.retire)
    get_children = _Driven(RedisPrograms.get_children)
    get_failures = _Driven(RedisPrograms.get_failures)
    list_workers = _Driven(RedisPrograms.list_workers)
    watched_children = _Driven(RedisPrograms.watched_children)
    unwatch_child = _Driven(RedisPrograms.unwatch_child)
    reap_lost = _Driven(RedisPrograms.reap_lost)
    get_nodes = _Driven(RedisPrograms.get_nodes)
    get_node = _Driven(RedisPrograms.get_node)
    list_sessions = _Driven(RedisPrograms.list_sessions)
    delete = _Driven(RedisPrograms.delete)
    remove_expired = _Driven(RedisPrograms.remove_expired)
    end_stalled = _Driven(RedisPrograms.end_stalled)
    read_events = _Driven(RedisPrograms.read_events)

    def asynchronous(self) -> AsyncRedisStore:
        """An asyncio flavour on the same server: a ``redis.asyncio`` client (and pool) per event loop."""
        connect = functools.partial(
            clients.connect,
            self._settings,
            url=self.url,
            like=self._client,
            cluster=self.programs.cluster,
            asynchronous=True,
        )
        return AsyncRedisStore(self.programs, connect, self.url)

    def close(self) -> None:
        self._client.close()


def _start(generator: AsyncGenerator[None, None]) -> None:
    """Run ``generator`` to its first ``yield`` now, in the running loop, without a task.

    The first step is what registers an async generator with the running loop (its ``firstiter``
    hook), so that the loop's ``shutdown_asyncgens()`` closes it. Stepped by a task instead, a loop
    ending before the task ran would leave it never started, its ``finally`` never run. The
    generators given here await nothing before their ``yield``: the step ends at once.
    """
    with contextlib.suppress(StopIteration):  # StopIteration: it reached its yield
        generator.asend(None).send(None)


@dataclass(eq=False)
class _LoopClient:
    """The ``redis.asyncio`` client of one event loop, its scripts, and what closes it with the loop."""

    client: Any
    scripts: dict[str, Any]
    closer: AsyncGenerator[None, None] | None = None


class AsyncRedisStore:
    """The asyncio flavour of :class:`RedisStorageAdapter`: the same programs, driven with
    ``redis.asyncio`` clients.

    A ``redis.asyncio`` client (its pool, its connections) belongs to the event loop it first ran
    in; from any other it fails ("attached to a different loop", "Event loop is closed"). So the
    adapter keeps a client per event loop, made by ``connect`` on the loop's first call: one adapter
    serves repeated ``asyncio.run`` calls, a loop per thread, and a loop per test.

    A loop's client is closed with its loop: it is tied to an async generator of that loop, which
    ``loop.shutdown_asyncgens()`` closes while the loop can still await the close (``asyncio.run``,
    ``asyncio.Runner``, pytest-asyncio, anyio and uvicorn call it before closing their loop). The
    client of a loop closed without it (a bare ``loop.close()``) is dropped when another loop makes
    its client: nothing in redis-py can close a connection of a closed loop (the transport's
    close needs the loop), so the garbage collector closes its sockets.

    Args:
        programs: The operations (those of the blocking adapter it comes from).
        connect: Makes a new client (on a loop's first call, in that loop).
        url: The server, for error messages.
    """

    def __init__(self, programs: RedisPrograms, connect: Callable[[], Any], url: str | None = None) -> None:
        self.programs = programs
        self.url = url
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()
        # Loops whose shutdown closed their client. A client made there after that (a call from
        # another async generator's cleanup) is not tied to the loop again: a generator first
        # run after shutdown_asyncgens() would never be closed, and asyncio warns about it.
        self._shut_down: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        # Each loop runs in one thread, but the loops of several threads add and drop their
        # clients in the same mappings.
        self._lock = threading.Lock()

        self._connect = connect

    @property
    def client(self) -> Any:
        """The running loop's ``redis.asyncio`` client (made on the loop's first use)."""
        return self._here().client

    def _here(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)  # every call but a loop's first: no lock
        return found if found is not None else self._open(loop)

    def _open(self, loop: asyncio.AbstractEventLoop) -> _LoopClient:
        client = self._connect()
        here = _LoopClient(client, _register_scripts(client))
        with self._lock:
            # The clients of loops closed without shutting down their async generators (see the
            # class): no call can reach them any more.
            for closed in [other for other in self._clients if other.is_closed()]:
                del self._clients[closed]
            self._clients[loop] = here
            # Without asyncgen hooks (a loop that does not run them) nothing would ever close the
            # generator, and the garbage collector would close it without a loop to await in.
            tie = loop not in self._shut_down and sys.get_asyncgen_hooks().firstiter is not None
        if tie:
            here.closer = self._close_with_loop(loop, here)
            _start(here.closer)
        return here

    async def _close_with_loop(self, loop: asyncio.AbstractEventLoop, here: _LoopClient) -> AsyncGenerator[None, None]:
        """Waits at its ``yield`` until closed (the loop's shutdown, or :meth:`close`), then closes the client."""
        try:
            yield
        finally:
            with self._lock:
                if self._clients.get(loop) is here:  # still held: not close() (it lets go first), the loop ends
                    del self._clients[loop]
                    self._shut_down.add(loop)
            await here.client.aclose()

    async def _execute(self, batch: list[Command], here: _LoopClient) -> list[Any]:
        client, scripts = here.client, here.scripts
        if self.programs.cluster:
            # redis.asyncio's RedisCluster picks a command's node before it loads the slot map: a
            # command sent while the map is empty (first use, or after the client reset it on
            # MOVED) goes to a random node, and the MOVED storm that follows makes it close
            # connections other callers are using. Loading the map first (a no-op once loaded)
            # keeps every command on its slot's node.
            await client.initialize()
        if len(batch) == 1 or (self.programs.cluster and _has_script(batch)):
            return [await _queue(command, client, scripts) for command in batch]
        pipe = client.pipeline(transaction=False)
        for command in batch:
            if isinstance(command, Script):
                await _queue(command, pipe, scripts)  # a script queues itself by awaiting
            else:
                _queue(command, pipe, scripts)
        return list(await pipe.execute())

    async def run(self, call: StoreCall[T]) -> T:
        """Run one verb of :class:`tracker.storage.base.SessionStorageAdapter`."""
        program: Program[T] = getattr(self.programs, call.verb)(*call.args, **call.kwargs)
        here = self._here()
        replies: list[Any] | None = None
        try:
            while True:
                replies = await self._execute(program.send(replies), here)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except redis.RedisError as exc:
            raise _unavailable(exc, self.url) from exc

    async def close(self) -> None:
        """Close the running loop's client; the loop's next call makes a new one.

        The clients of other loops are closed with their loops.
        """
        with self._lock:
            here = self._clients.pop(asyncio.get_running_loop(), None)
        if here is None:
            return
        if here.closer is not None:
            await here.closer.aclose()  # its finally closes the client
        else:
            await here.client.aclose()
