"""Module-level backends that tests reach by import path (``"_sample_backends:Greeter"``), and the
helpers the test modules share: :class:`Gate`, :func:`gated`, :func:`wait_until` and
:func:`until_queued`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aioserve import Serve

HANG_GUARD_S = 10.0  # turns a hang into a failure; never reached when things work


class Greeter:
    """A sync class backend with a constructor argument."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def __call__(self, name: str) -> str:
        return f"{self.greeting} {name}"


def shout(text: str) -> str:
    """A sync function backend."""
    return text.upper()


class ListDoubler:
    """A 1.3-style batch backend given by import path: not marked @accept_batch, it takes a list
    (of values, or of 1.x requests with the legacy_requests switch) and returns a list."""

    async def __call__(self, items: list[Any]) -> list[Any]:
        values = [await item.json() if hasattr(item, "json") else item for item in items]
        return [{"doubled": value * 2, "batch_size": len(items)} for value in values]


class Gate:
    """Async handlers wait at a gate: tests see who is inside, then open it.

    Create it inside a test: it uses asyncio primitives of the running loop.
    """

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.inside = 0
        self.max_inside = 0
        self.entries: list[object] = []
        self.cancelled: list[object] = []
        self._changed = asyncio.Condition()

    async def pass_through(self, item: object) -> object:
        """Record ``item`` as entered, wait until the gate opens, return ``item``."""
        self.entries.append(item)
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        async with self._changed:
            self._changed.notify_all()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        finally:
            self.inside -= 1
        return item

    async def until_inside(self, n: int, timeout_s: float = HANG_GUARD_S) -> None:
        """Wait until ``n`` handlers are inside at once (fails after ``timeout_s``)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.inside >= n), timeout_s)


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout_s: float = HANG_GUARD_S
) -> None:
    """Wait until ``predicate()`` holds, checking it again each time the loop has run what was
    ready. ``timeout_s`` only turns a hang into a failure that names ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0)  # let the loop run; no guess at a duration


async def until_queued(serve: Serve, backend_tag: str, n: int) -> None:
    """Wait until ``n`` requests wait in ``backend_tag``'s queue (for a replica or a batch)."""
    await wait_until(
        lambda: serve.backend_statistics(backend_tag).num_queued == n,
        f"{n} request(s) queued at backend {backend_tag!r}",
    )


def gated(gate: Gate) -> Any:
    """An async handler that passes through ``gate``."""

    async def handler(x: Any = None) -> Any:
        return await gate.pass_through(x)

    return handler
