"""A small Server-Sent Events reader for tests (the wire format, parsed by hand on purpose)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Message:
    """One SSE message: a dispatched event, or a comment-only block (a ping)."""

    event: str | None = None
    id: str | None = None
    data_lines: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def data(self) -> Any:
        """The data lines joined and decoded as JSON."""
        return json.loads("\n".join(self.data_lines))

    @property
    def is_event(self) -> bool:
        """True when a browser would dispatch it (it has data)."""
        return bool(self.data_lines)


async def messages(response: httpx.Response) -> AsyncIterator[Message]:
    """Parse the response body into messages as they arrive."""
    current = Message()
    async for line in response.aiter_lines():
        if line == "":
            if current.data_lines or current.comments or current.retry is not None or current.id is not None:
                yield current
            current = Message()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            current.comments.append(value)
        elif name == "event":
            current.event = value
        elif name == "id":
            current.id = value
        elif name == "data":
            current.data_lines.append(value)
        elif name == "retry":
            current.retry = int(value)


async def events(response: httpx.Response) -> AsyncIterator[Message]:
    """Only the messages a browser dispatches (no pings, no retry-only blocks)."""
    async for message in messages(response):
        if message.is_event:
            yield message


def parse_all(body: str) -> list[Message]:
    """Parse a complete (buffered) body."""
    result: list[Message] = []
    current = Message()
    for line in body.splitlines():
        if line == "":
            if current.data_lines:
                result.append(current)
            current = Message()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            current.event = value
        elif name == "id":
            current.id = value
        elif name == "data":
            current.data_lines.append(value)
    if current.data_lines:
        result.append(current)
    return result
