"""Every Redis key the tracker uses is built here.

Per session (all share the hash tag ``{<session_id>}``, so one Lua script may touch them all,
also on Redis Cluster):

===================================  ======  ===================================================
``<prefix>:{<sid>}:session``         HASH    metadata and counters: ``canvas_path``, ``node_count``,
                                             ``status``, ``progress``, ``completed``, ``failed``,
                                             ``running``, ``lost``, ``cancelled``, ``created_ms``,
                                             ``updated_ms``, ``started_ms``, ``finished_ms``,
                                             ``metadata`` (JSON), ``request`` (``<id>|<previous
                                             status>`` of the last create/transition/resume, so
                                             a retried call is answered, not applied twice),
                                             ``finish_request`` (id of the node event that ended
                                             the session: its retry is told ``finished`` again),
                                             ``success_call`` / ``failure_call`` (the calls told
                                             to send on_success / on_failure), ``run`` (1, then
                                             one more per resume), ``alive_ms`` (last heartbeat
                                             of a worker running one of its nodes), ``linked``
                                             (1: it has a structure to follow), ``partial`` (the
                                             running nodes' reported progress, summed in
                                             ``states.PROGRESS_UNITS``), ``failure_types`` (how many
                                             error types its failures hash holds), ``rate`` (the
                                             recent rate window, ``states.RateWindow``), ``tags``
                                             (space-separated), ``ended_ttl`` (seconds its keys live
                                             once it has ended)
``<prefix>:{<sid>}:nodes``           HASH    node id -> ``status|attempts|started_ms|finished_ms|
                                             task_id|worker|payload`` (payload: JSON object with
                                             ``result``, ``error``, ``reason``, or a running
                                             node's ``progress``; may be empty)
``<prefix>:{<sid>}:sigs``            HASH    node id -> the node's Celery signature (JSON), for resume;
                                             and the session's structure (tracker.structure): ``#tree``,
                                             ``>node`` (what runs after it), ``<node`` / ``^node``
                                             (what an error callback handles / its part's last tasks)
``<prefix>:{<sid>}:events``          STREAM  one entry per change (capped, approximate trim)
``<prefix>:{<sid>}:by_status``       ZSET    ``<status>|<node id>`` per node record, all scored 0:
                                             the nodes of one status as a lexicographic range
                                             (pages of ``get_nodes`` by status)
``<prefix>:{<sid>}:children``        HASH    the child sessions its nodes' tasks opened: child id ->
                                             ``node_id|attempt|policy|state`` (``open`` or the
                                             child's end status); ``#<node id>`` ->
                                             ``attempt|open|failed_child`` (that node's latest
                                             attempt's children: how many are open, the first
                                             that failed); absent while it has none
``<prefix>:{<sid>}:failures``        HASH    its failed and lost nodes by cause: error type -> JSON
                                             ``{count, message, first_ms, last_ms, nodes}`` (the
                                             first message, the first few node ids); absent while
                                             it has none
===================================  ======  ===================================================

Global (not atomic with session writes; they only help to find sessions):

===================================  ======  ===================================================
``<prefix>:index:created``           ZSET    session id scored by creation time (ms): listing
``<prefix>:index:expiry``            ZSET    session id scored by when it expires less the shorter
                                             retention (ms; a lower bound, at first its creation):
                                             cleanup candidates; re-checked before deleting
``<prefix>:index:tag:<tag>``         ZSET    session id scored by creation time: sessions with the tag
``<prefix>:index:paths``             ZSET    ``<canvas path>\0<newest-first ms>\0<session id>`` per
                                             session, all scored 0 (``path_member``): the sessions
                                             whose canvas path starts with a prefix are a
                                             lexicographic range, newest first within one path
``<prefix>:index:filed``            HASH    session id -> ``<tags>\n<paths member>``: which filter
                                             index entries a session has, so that they leave with
                                             it, also when Redis expired it by TTL (``filed``)
``<prefix>:index:children``          ZSET    ``<child id> <parent id> <parent node>`` scored by the
                                             child's creation (ms): children whose end was not
                                             told to their parent yet (``maintain`` tells it)
``<prefix>:workers``                 ZSET    worker process id -> last heartbeat (ms)
``<prefix>:held:<worker>``           SET     ``"<session_id> <node_id>"`` the worker process runs
``<prefix>:suspects``                ZSET    silent worker process id -> when a reaper first saw it
                                             silent (ms); reaped once silent a grace period more
``<prefix>:reaper``                  STRING  ``1``/``0``: the last reaper pass saw a live worker or not
``<prefix>:reaped``                  STRING  when a reaper last reaped a dead worker process (ms)
===================================  ======  ===================================================

Every session key gets the session timeout as TTL on every write (an ended session's the finished
TTL), so nothing outlives an abandoned session even when cleanup never runs. Cleanup and ``delete``
take a session out of every index; listing drops what expired by TTL as it passes by.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracker import validation

#: Later than any creation time a session will have (ms; the year 2286): ``path_member`` counts
#: down from it, so that the newest session of a path comes first.
_LAST_MS = 9_999_999_999_999


def filed(tags: list[str], member: str) -> str:
    """A session's entry in the filed index: its tags (space-separated), a newline, its paths member."""
    return f"{' '.join(tags)}\n{member}"


def path_member(canvas_path: str, created_ms: int, session_id: str) -> str:
    """A session's member of the canvas paths index: its path, then its creation time counted down
    (13 digits), then its id, separated by NUL (a canvas path is printable: it holds none)."""
    return f"{canvas_path}\0{_LAST_MS - created_ms:013d}\0{session_id}"


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one session, in the order every script takes them (``KEYS[1..7]``)."""

    session: str
    nodes: str
    sigs: str
    events: str
    by_status: str
    children: str
    failures: str

    def all(self) -> list[str]:
        """``[session, nodes, sigs, events, by_status, children, failures]``."""
        return [self.session, self.nodes, self.sigs, self.events, self.by_status, self.children, self.failures]


@dataclass(frozen=True)
class KeySpace:
    """Builds keys under one prefix.

    Args:
        prefix: The first part of every key (letters, digits, ``_.-``).
    """

    prefix: str = "tracker"

    def session(self, session_id: str) -> SessionKeys:
        """The keys of ``session_id`` (validated first: only a UUID becomes part of a key)."""
        sid = validation.session_id(session_id)
        base = f"{self.prefix}:{{{sid}}}"
        return SessionKeys(
            f"{base}:session",
            f"{base}:nodes",
            f"{base}:sigs",
            f"{base}:events",
            f"{base}:by_status",
            f"{base}:children",
            f"{base}:failures",
        )

    @property
    def created_index(self) -> str:
        """Sessions by creation time."""
        return f"{self.prefix}:index:created"

    @property
    def expiry_index(self) -> str:
        """Sessions by when they expire, less the shorter retention (cleanup candidates)."""
        return f"{self.prefix}:index:expiry"

    def tag_index(self, tag: str) -> str:
        """Sessions with ``tag`` (validated first), by creation time."""
        return f"{self.prefix}:index:tag:{validation.tag(tag)}"

    @property
    def path_index(self) -> str:
        """Every session by canvas path (:func:`path_member`): a prefix is a lexicographic range."""
        return f"{self.prefix}:index:paths"

    @property
    def filed_index(self) -> str:
        """Session id -> its tags and its paths member (what to take out of the filter indexes)."""
        return f"{self.prefix}:index:filed"

    @property
    def children_index(self) -> str:
        """Child sessions whose end has not been told to their parent yet (``<child> <parent> <node>``)."""
        return f"{self.prefix}:index:children"

    @property
    def workers(self) -> str:
        """Worker processes by last heartbeat."""
        return f"{self.prefix}:workers"

    @property
    def suspects(self) -> str:
        """Silent worker processes by when a reaper first found them silent (the grace starts)."""
        return f"{self.prefix}:suspects"

    @property
    def reaper(self) -> str:
        """What the last reaper pass saw: ``1`` some worker alive, ``0`` none (an outage, or all dead)."""
        return f"{self.prefix}:reaper"

    @property
    def reaped(self) -> str:
        """When a reaper last reaped a dead worker process (ms): sessions older may have lost a message."""
        return f"{self.prefix}:reaped"

    def held(self, worker: str) -> str:
        """The nodes ``worker`` (a validated worker process id) is running."""
        return f"{self.prefix}:held:{validation.worker_id(worker)}"
