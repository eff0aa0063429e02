"""tracker: follow batches of Celery work as sessions, exactly, from dispatch to the end."""

from tracker.config import TrackerSettings
from tracker.errors import (
    InvalidStateTransitionError,
    NodeLimitError,
    NodeNotFoundError,
    ResumeNotPossibleError,
    SessionExistsError,
    SessionNotFoundError,
    StorageUnavailableError,
    TrackerError,
    TrackerNotInstalledError,
    TrackerValidationError,
    WrongCeleryAppError,
)
from tracker.manager import SessionManager, SyncSessionManager
from tracker.models import (
    FailureGroup,
    NodeError,
    NodePage,
    NodeResult,
    NodeSpec,
    ParallelTaskStatus,
    SessionEvent,
    SessionInfo,
    SessionPage,
    WorkerInfo,
)
from tracker.states import (
    VALID_TRANSITIONS,
    NodeStatus,
    SessionStatus,
    is_valid_transition,
)
from tracker.storage import InMemoryStorageAdapter, SessionStorageAdapter

# RedisStorageAdapter, as tracker.storage gives it: redis is imported when it is first asked for.
from tracker.storage import __getattr__ as __getattr__

__version__ = "0.1.0"

__all__ = [
    # States
    "VALID_TRANSITIONS",
    "NodeStatus",
    "SessionStatus",
    "is_valid_transition",
    # Models
    "FailureGroup",
    "NodeError",
    "NodePage",
    "NodeResult",
    "NodeSpec",
    "ParallelTaskStatus",
    "SessionEvent",
    "SessionInfo",
    "SessionPage",
    "WorkerInfo",
    # Storage
    "InMemoryStorageAdapter",
    "RedisStorageAdapter",
    "SessionStorageAdapter",
    # Errors
    "InvalidStateTransitionError",
    "ResumeNotPossibleError",
    "TrackerNotInstalledError",
    "WrongCeleryAppError",
    "NodeLimitError",
    "NodeNotFoundError",
    "SessionExistsError",
    "SessionNotFoundError",
    "StorageUnavailableError",
    "TrackerError",
    "TrackerValidationError",
    # Manager
    "SessionManager",
    "SyncSessionManager",
    "TrackerSettings",
]
