"""Helpers for tests that run ``python -m aioserve run ...`` in a subprocess.

Each process runs in a session of its own, so that it and its workers can be killed together
when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TOML = "examples/deployment.toml"
START_TIMEOUT_S = 20.0


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = (str(extra_path) if extra_path else None, str(REPO), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Running:
    """One ``python -m aioserve run ...`` process, its stdout read line by line on a thread."""

    def __init__(self, args: list[str], stderr_path: Path, extra_path: Path | None = None) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aioserve", "run", *args],
            cwd=REPO,
            env=_env(extra_path),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def url(self) -> str:
        """Wait (bounded) for the "serving on" line and return its URL."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"exited with {self.proc.wait()} before serving:\n{self.stderr}")
            self.stdout.append(line)
            found = re.search(r"aioserve is serving on (http://\S+)", line)
            if found:
                return found.group(1)
        pytest.fail(f"no 'serving on' line within {START_TIMEOUT_S} s:\n{self.stderr}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def close(self) -> None:
        if self.proc.poll() is None:
            # A test that did not stop it: let it clean up after itself (a --workers parent
            # removes its run directory), then make sure.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        # Its workers share its process group: make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def until(
    predicate: Callable[[], bool],
    what: str | Callable[[], str],
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Poll another process's visible state (a file, an HTTP answer) until ``predicate()``.
    ``what`` names it in the failure (a callable: made then, to tell what was seen last)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what() if callable(what) else what}")
        time.sleep(0.01)


def get_in_thread(
    url: str, timeout_s: float = 60
) -> tuple[threading.Thread, list[httpx.Response | BaseException]]:
    """GET ``url`` from a thread of its own (the server is a subprocess that the test signals
    meanwhile); the list gets the response, or what was raised."""
    out: list[httpx.Response | BaseException] = []

    def get() -> None:
        try:
            out.append(httpx.get(url, timeout=timeout_s))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread, out
