"""The seed story's sample test, as written there (the public API is a contract)."""

import pytest

from tracker import SessionManager


@pytest.fixture
def session_manager():
    """Reset singleton for each test"""
    SessionManager.reset_instance()
    return SessionManager.get_instance()


@pytest.mark.asyncio
async def test_session_creation(session_manager):
    session_id = await session_manager.create_session(canvas_path="test.canvas", node_count=10)
    assert session_id is not None
    assert len(session_id) == 36  # UUID4 format


def test_public_names_import() -> None:
    from tracker import (  # noqa: F401
        VALID_TRANSITIONS,
        InMemoryStorageAdapter,
        InvalidStateTransitionError,
        NodeResult,
        RedisStorageAdapter,
        SessionInfo,
        SessionManager,
        SessionNotFoundError,
        SessionStatus,
        SessionStorageAdapter,
        is_valid_transition,
    )
