"""What a session records of the app that dispatched it, and which app cancel and resume pick."""

from __future__ import annotations

import pytest
from celery import Celery

from tests.cli import apps
from tracker import WrongCeleryAppError
from tracker.celery.origin import ORIGIN_KEY, broker_fingerprint, broker_location, dispatching_app, import_path, origin


def app_on(url: str) -> Celery:
    return Celery("origin-test", broker=url, set_as_current=False)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("redis://:secret@127.0.0.1:6379/0", "redis://localhost:6379/0"),
        ("amqp://guest:guest@localhost:5672//", "pyamqp://other:pw@127.0.0.1//"),
        ("redis://127.0.0.1/0", "redis://localhost:6379/0"),
    ],
)
def test_the_same_broker_spelled_differently_has_one_fingerprint(one: str, other: str) -> None:
    assert broker_fingerprint(app_on(one)) == broker_fingerprint(app_on(other))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/0"),
        ("redis://127.0.0.1:6379/0", "redis://10.0.0.2:6379/0"),
        ("amqp://localhost:5672/one", "amqp://localhost:5672/two"),
        ("redis://127.0.0.1:6379/0", "amqp://127.0.0.1:6379//"),
    ],
)
def test_another_broker_has_another_fingerprint(one: str, other: str) -> None:
    assert broker_fingerprint(app_on(one)) != broker_fingerprint(app_on(other))


def test_the_location_leaves_credentials_out() -> None:
    location = broker_location(app_on("amqp://user:s3cret@rabbit.example:5672/prod"))
    assert location == "amqp://rabbit.example:5672/prod"
    assert "s3cret" not in str(origin(app_on("redis://:s3cret@h:1/0")))


def test_the_import_path_is_a_module_attribute_outside_celery() -> None:
    assert import_path(apps.worker_app) == "tests.cli.apps:worker_app"
    assert import_path(Celery("made-here", set_as_current=False)) is None


def test_an_app_given_on_another_broker_is_refused_and_one_on_the_same_broker_taken() -> None:
    recorded = {ORIGIN_KEY: {"app": "proj.celery:app", "broker": broker_fingerprint(app_on("redis://h:1/0"))}}
    same = app_on("redis://:pw@h:1/0")
    assert dispatching_app("s", recorded, same) is same
    with pytest.raises(WrongCeleryAppError, match=r"dispatched by the Celery app proj.celery:app.*redis://h:2/0"):
        dispatching_app("s", recorded, app_on("redis://h:2/0"))


def test_without_an_app_the_recorded_one_is_imported_else_the_fallback_must_match() -> None:
    apps.worker_app.conf.broker_url = apps.worker_app.conf.broker_url or "redis://127.0.0.1:6379/0"
    recorded = {ORIGIN_KEY: {"app": "tests.cli.apps:worker_app", "broker": broker_fingerprint(apps.worker_app)}}
    assert dispatching_app("s", recorded, None, fallback=lambda: app_on("redis://elsewhere:1/0")) is apps.worker_app
    missing = {ORIGIN_KEY: {"app": "no_such_module:app", "broker": broker_fingerprint(apps.worker_app)}}
    with pytest.raises(WrongCeleryAppError, match=r"no_such_module:app cannot be imported here"):
        dispatching_app("s", missing, None, fallback=lambda: app_on("redis://elsewhere:1/0"))
    twin = app_on(apps.worker_app.conf.broker_url)
    assert dispatching_app("s", missing, None, fallback=lambda: twin) is twin


def test_a_session_without_a_record_takes_the_app_given() -> None:
    given = app_on("redis://h:1/0")
    assert dispatching_app("s", {}, given) is given
    assert dispatching_app("s", {ORIGIN_KEY: "not a record"}, None, fallback=lambda: given) is given
