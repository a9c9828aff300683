"""Module-level backends that tests reach by import path (``"_sample_backends:Greeter"``), and
:class:`Gate`, a helper shared by test_backend.py and test_handle.py."""

from __future__ import annotations

import asyncio
from typing import Any


class Greeter:
    """A sync class backend with a constructor argument."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def __call__(self, name: str) -> str:
        return f"{self.greeting} {name}"


def shout(text: str) -> str:
    """A sync function backend."""
    return text.upper()


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

    async def until_inside(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until ``n`` handlers are inside at once (fails after ``timeout_s``)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.inside >= n), timeout_s)


async def loop_turns(n: int = 5) -> None:
    """Let the loop run every ready callback a few times: enough for spawned requests to reach
    their replica or the queue. Not a guess at timing: nothing here waits on a clock."""
    for _ in range(n):
        await asyncio.sleep(0)


def gated(gate: Gate) -> Any:
    """An async handler that passes through ``gate``."""

    async def handler(x: Any = None) -> Any:
        return await gate.pass_through(x)

    return handler
