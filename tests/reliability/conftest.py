"""Reliability fixtures: redis-servers of each test's own (to stop, restart or cut), a broker, workers.

Each scenario that injects a fault into the store gets a redis-server of its own, separate from
the broker's, so stopping it touches nothing else. Workers are real prefork subprocesses running
:mod:`tests.reliability.appmod`; each test publishes to a queue of its own. The broker is a
redis-server of its own (``rel_broker``) or, for a test that asks, a RabbitMQ node of its own
(``rel_rabbitmq``, started once per test session on first use; ``rel_broker_url`` picks one).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.helpers import Worker
from tests.servers import RedisProcess, rabbitmq_process, redis_process
from tests.workers import ROOT
from tracker.celery import install, uninstall

StartRedis = Callable[..., RedisProcess]
"""``start_redis(*extra_args, password=None)``: a started redis-server of this test's own."""

MakeWorker = Callable[..., Worker]
"""``make_worker(store_url, concurrency=2, visibility_s=None, env_extra=None, broker_url=None)``: a started
worker (on ``rel_broker`` unless ``broker_url`` is given)."""

BROKERS = ["redis", "rabbitmq"]
"""The brokers ``rel_broker_url`` can give, for ``parametrize("rel_broker_url", BROKERS, indirect=True)``."""


@pytest.fixture(scope="package", autouse=True)
def rel_app_installed() -> Iterator[None]:
    """The tracker installed in :mod:`~tests.reliability.appmod`'s app in this process too, as in any
    process that dispatches (``dispatch`` refuses an app without it). No task of it runs here: its
    handlers only ever see other apps' tasks, which they leave alone."""
    from tests.reliability import appmod

    install(appmod.app, beat=False)
    yield
    uninstall(appmod.app)


@pytest.fixture(scope="session")
def rel_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The broker (and result backend) of the reliability workers: a redis-server of its own."""
    with redis_process(tmp_path_factory.mktemp("rel-broker")) as server:
        from tests.reliability import appmod

        appmod.app.conf.update(broker_url=server.url, result_backend=server.url)
        yield server.url


@pytest.fixture(scope="session")
def rel_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ node of the tests' own (its own node name, ports, epmd, data): its AMQP URL.

    Started once per test session on first use (it takes 5-15 s), stopped at the end.
    """
    with rabbitmq_process(tmp_path_factory.mktemp("rel-rabbitmq")) as server:
        yield server.url


@contextlib.contextmanager
def publishing_to(broker_url: str) -> Iterator[None]:
    """Make :mod:`~tests.reliability.appmod`'s app publish to ``broker_url`` in this process
    (dispatch, callbacks sent by a reaper here), then restore its broker.

    The app keeps its connection and producer pools once made: they are dropped on each switch
    (kombu keeps them per URL, so switching back reuses the old ones).
    """
    from tests.reliability import appmod

    app = appmod.app

    def point(url: str) -> None:
        app.conf.broker_url = url
        app._pool = None
        app.amqp._producer_pool = None

    before = app.conf.broker_url
    point(broker_url)
    try:
        yield
    finally:
        point(before)


@pytest.fixture
def rel_broker_url(request: pytest.FixtureRequest, rel_broker: str) -> Iterator[str]:
    """The broker of this test: ``rel_broker`` or, parametrised indirectly with ``"rabbitmq"``,
    ``rel_rabbitmq``. This process publishes through ``appmod.app`` to it while the test runs; pass
    it to ``make_worker(..., broker_url=...)``."""
    kind = getattr(request, "param", "redis")
    if kind not in BROKERS:
        raise ValueError(f"unknown broker {kind!r}; one of {BROKERS}")
    url = rel_broker if kind == "redis" else str(request.getfixturevalue("rel_rabbitmq"))
    with publishing_to(url):
        yield url


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[StartRedis]:
    """Start redis-servers in this test's temp dir; all are stopped at the end."""
    started: list[RedisProcess] = []

    def start(*extra: str, password: str | None = None) -> RedisProcess:
        directory = tmp_path / f"redis{len(started)}"
        directory.mkdir()
        server = RedisProcess(directory=directory, extra=extra, password=password)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def rel_queue() -> str:
    """A queue of this test's own: its signatures carry it, its workers consume only it."""
    return f"rel-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_worker(rel_broker: str, rel_queue: str, key_prefix: str, tmp_path: Path) -> Iterator[MakeWorker]:
    """Start prefork workers on this test's queue and key prefix; all are killed at the end."""
    started: list[Worker] = []

    def make(
        store_url: str,
        concurrency: int = 2,
        visibility_s: int | None = None,
        env_extra: dict[str, str] | None = None,
        broker_url: str | None = None,
    ) -> Worker:
        env = {
            **os.environ,
            "TRACKER_REL_WORKER": "1",
            "TRACKER_REL_BROKER": broker_url or rel_broker,
            "TRACKER_REL_QUEUE": rel_queue,
            "TRACKER_REDIS_URL": store_url,
            "TRACKER_KEY_PREFIX": key_prefix,
            "PYTHONPATH": str(ROOT),
            **(env_extra or {}),
        }
        if visibility_s is not None:
            env["TRACKER_REL_VISIBILITY"] = str(visibility_s)
        worker = Worker(env, tmp_path / f"worker{len(started)}.log", concurrency)
        started.append(worker)
        worker.start()
        return worker

    yield make
    # The test is over and nothing waits on them: SIGKILL (a warm shutdown takes seconds each). The
    # queue is this test's own, so what they held is never delivered to another test's worker.
    for worker in started:
        worker.kill()
