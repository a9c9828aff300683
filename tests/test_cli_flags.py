"""``aioserve run``'s operator flags, in real subprocesses on real ports: the access log,
``--version``, ``--reload``, ``--root-path``, ``--debug``, the startup summary and the drain lines.

Log lines are read from the process's stderr once they are there (a bounded poll), never after a
guessed sleep; every process is killed with its workers when the test ends.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from _processes import EXAMPLE_TOML, REPO, Running, _env, _free_port, get_in_thread, until

import aioserve

APP = """
import asyncio
import os
import pathlib

MARKS = pathlib.Path(os.environ.get("MARKS", "."))


def hello(request):
    return "hello"


def boom(request):
    raise RuntimeError("the model broke")


async def where(request):
    return {
        "root_path": request.scope["root_path"],
        "path": request.url.path,
        "url": str(request.url),
        "base_url": str(request.base_url),
    }


async def pid(request):
    return os.getpid()


async def gated(request):
    (MARKS / "entered").write_text("x")
    while not (MARKS / "release").exists():  # the test decides when it answers
        await asyncio.sleep(0.01)
    return "released"


async def setup(serve):
    await serve.create_backend("hello", hello)
    await serve.create_endpoint("hello", backend="hello", route="/hello", methods=["GET", "POST"])
    await serve.create_backend("boom", boom)
    await serve.create_endpoint("boom", backend="boom", route="/boom")
    await serve.create_backend("where", where)
    await serve.create_endpoint("where", backend="where", route="/where")
    await serve.create_backend("pid", pid)
    await serve.create_endpoint("pid", backend="pid", route="/pid")
    await serve.create_backend("gated", gated)
    await serve.create_endpoint("gated", backend="gated", route="/gated")
    await serve.create_endpoint("empty", route="/empty")  # no traffic yet: 503
"""

ACCESS = re.compile(
    r'INFO aioserve\.access: (?P<client>\S+) "(?P<method>[A-Z]+) (?P<target>\S+)" '
    r"(?P<status>\d{3}) (?P<ms>\d+\.\d\d)ms id=(?P<id>\S+)$",
    re.MULTILINE,
)


def start_app(
    run: Callable[..., Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str
) -> Running:
    """``aioserve run flagsapp:setup ARGS``; the app leaves its marks in ``tmp_path``."""
    monkeypatch.setenv("MARKS", str(tmp_path))
    code = tmp_path / "code"
    code.mkdir()
    (code / "flagsapp.py").write_text(textwrap.dedent(APP))
    return run("flagsapp:setup", *args, extra_path=code)


def access_lines(server: Running) -> list[dict[str, str]]:
    return [m.groupdict() for m in ACCESS.finditer(server.stderr)]


def wait_for_log(server: Running, needle: str) -> None:
    until(lambda: needle in server.stderr, f"{needle!r} in the log:\n{server.stderr}")


class Answer:
    """One request over its own connection: what the client saw, and its own address."""

    def __init__(self, url: str, method: str, path: str, **kwargs: Any) -> None:
        parsed = httpx.URL(url)
        conn = http.client.HTTPConnection(parsed.host, parsed.port, timeout=10)
        try:
            conn.connect()
            assert conn.sock is not None
            self.client = "{}:{}".format(*conn.sock.getsockname()[:2])
            conn.request(method, path, **kwargs)
            response = conn.getresponse()
            self.status = response.status
            self.request_id = response.getheader("x-request-id") or "-"
            self.body = response.read().decode()
        finally:
            conn.close()


# -- the access log --------------------------------------------------------------------------------


def test_every_answer_has_an_access_line(
    run: Callable[..., Running],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server_name: str,
) -> None:
    server = start_app(
        run,
        tmp_path,
        monkeypatch,
        "--port",
        "0",
        "--max-body-bytes",
        "100",
        "--server",
        server_name,
    )
    url = server.url()
    many_headers = {f"x-h{i}": "v" for i in range(120)}
    answers = [
        (
            "GET",
            "/hello?name=ada",
            Answer(url, "GET", "/hello?name=ada", headers={"X-Request-ID": "given-1"}),
        ),
        ("POST", "/hello", Answer(url, "POST", "/hello", body=b"x" * 500)),
        ("GET", "/nope", Answer(url, "GET", "/nope")),
        ("DELETE", "/hello", Answer(url, "DELETE", "/hello")),
        ("GET", "/empty", Answer(url, "GET", "/empty")),
        ("GET", "/hello", Answer(url, "GET", "/hello", headers=many_headers)),
        ("GET", "/boom", Answer(url, "GET", "/boom")),
    ]
    statuses = [answer.status for _, _, answer in answers]
    assert statuses == [200, 413, 404, 405, 503, 431, 500]
    assert answers[0][2].request_id == "given-1"
    if server_name == "granian":
        # granian refuses more than 100 headers itself: that 431 never reaches the app.
        del answers[5]

    # A client that leaves before its answer: nothing was sent, the line says 499.
    with socket.create_connection(("127.0.0.1", httpx.URL(url).port)) as gone:
        gone.sendall(b"GET /gated HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-1\r\n\r\n")
        gone_client = "{}:{}".format(*gone.getsockname()[:2])
        until(lambda: (tmp_path / "entered").exists(), "the gated handler runs")
    until(lambda: len(access_lines(server)) == len(answers) + 1, "one line per request")

    lines = access_lines(server)
    for (method, target, answer), line in zip(answers, lines, strict=False):
        assert line["method"] == method
        assert line["target"] == target
        assert int(line["status"]) == answer.status
        assert line["client"] == answer.client
        assert line["id"] == answer.request_id  # the X-Request-ID of the response, or '-'
        assert 0 < float(line["ms"]) < 10_000
    assert lines[1]["id"] == "-"  # a 413 is given before the request has an id
    assert lines[-1]["status"] == "499"
    assert (lines[-1]["id"], lines[-1]["client"], lines[-1]["target"]) == (
        "gone-1",
        gone_client,
        "/gated",
    )
    assert server.stop() == 0


def test_no_access_log_silences_it(
    run: Callable[..., Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_app(run, tmp_path, monkeypatch, "--port", "0", "--no-access-log")
    url = server.url()
    assert httpx.get(f"{url}/hello").text == "hello"
    assert httpx.get(f"{url}/nope").status_code == 404
    assert server.stop() == 0  # its stderr is complete now
    assert "Shutting down" in server.stderr
    assert "aioserve.access" not in server.stderr


def test_workers_each_log_their_requests_and_one_logs_the_summary(
    run: Callable[..., Running],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server_name: str,
) -> None:
    port = _free_port()
    server = start_app(
        run,
        tmp_path,
        monkeypatch,
        *("--workers", "2", "--port", str(port), "--timeout-graceful-shutdown", "7"),
        *("--server", server_name),
    )
    url = server.url()
    wait_for_log(server, "backend gated")
    summaries = re.findall(r"aioserve \S+ ready on (\S+) \((.*)\)", server.stderr)
    assert len(summaries) == 1, server.stderr
    assert summaries[0][0] == url
    assert summaries[0][1].startswith(f"{server_name}, 2 worker processes")

    pids: set[int] = set()
    sent = 0
    while len(pids) < 2 and sent < 300:
        sent += 1
        response = httpx.get(f"{url}/pid", headers={"X-Request-ID": f"w-{sent}"})
        pids.add(response.json())
    assert len(pids) == 2, "one worker answered every request"
    until(
        lambda: len([a for a in access_lines(server) if a["id"].startswith("w-")]) == sent,
        "an access line for every request, from either worker",
    )
    # The ids the workers give are their own: none is given twice (forked workers too).
    assert httpx.get(f"{url}/nope").status_code == 404
    ids = [httpx.get(f"{url}/nope").headers["x-request-id"] for _ in range(20)]
    assert len(set(ids)) == len(ids)

    # A signal: each worker says how many of its requests drain, and for how long at most.
    thread, answer = get_in_thread(f"{url}/gated")
    until(lambda: (tmp_path / "entered").exists(), "the gated handler runs")
    server.proc.send_signal(signal.SIGTERM)
    wait_for_log(server, "Shutting down: 1 request(s) in flight drain for up to 7.0 s")
    wait_for_log(server, "Shutting down: 0 request(s) in flight drain for up to 7.0 s")
    (tmp_path / "release").write_text("x")
    thread.join(10)
    assert isinstance(answer[0], httpx.Response), answer
    assert (answer[0].status_code, answer[0].text) == (200, "released")
    assert server.proc.wait(timeout=20) == 0


def test_the_drain_line_says_how_many_requests_and_for_how_long(
    run: Callable[..., Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_app(run, tmp_path, monkeypatch, "--port", "0")
    url = server.url()
    thread, answer = get_in_thread(f"{url}/gated")
    until(lambda: (tmp_path / "entered").exists(), "the gated handler runs")
    server.proc.send_signal(signal.SIGTERM)
    # The bound is the longest graceful_shutdown_timeout_s of the backends (20 s by default).
    wait_for_log(server, "INFO aioserve.serve: Draining 1 request(s) for up to 20.0 s.")
    (tmp_path / "release").write_text("x")
    thread.join(10)
    assert isinstance(answer[0], httpx.Response), answer
    assert answer[0].text == "released"
    assert server.proc.wait(timeout=20) == 0


# -- --version -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--version"], ["run", "--version"]])
def test_version(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "aioserve", *argv],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout == f"aioserve {aioserve.__version__}\n"
    assert re.fullmatch(r"aioserve \d+\.\d+\.\d+\S*\n", done.stdout)


# -- --reload --------------------------------------------------------------------------------------

RELOADED = """
async def setup(serve):
    await serve.create_backend("answer", lambda request: {answer!r})
    await serve.create_endpoint("answer", backend="answer", route="/answer")
"""


def start_reloading(
    run: Callable[..., Running], tmp_path: Path, *args: str
) -> tuple[Running, str, Path]:
    """``aioserve run reloadapp:setup --reload`` on a module of its own; its URL and the module."""
    code = tmp_path / "code"
    code.mkdir()
    module = code / "reloadapp.py"
    module.write_text(RELOADED.format(answer="one"))
    server = run("reloadapp:setup", "--reload", "--reload-dir", str(code), *args, extra_path=code)
    url = server.url()
    assert httpx.get(f"{url}/answer").text == "one"
    return server, url, module


def served_answer(url: str) -> str:
    """What /answer says now ('' while no server process answers)."""
    try:
        return httpx.get(f"{url}/answer", timeout=5).text
    except httpx.TransportError:
        return ""


def test_reload_serves_an_edit(
    run: Callable[..., Running], tmp_path: Path, server_name: str
) -> None:
    server, url, module = start_reloading(run, tmp_path, "--port", "0", "--server", server_name)
    # A different length: a .pyc checked by size and mtime in whole seconds is never reused.
    module.write_text(RELOADED.format(answer="number two"))
    until(lambda: served_answer(url) == "number two", "the edit is served")
    assert server.url() == url  # a new server process, on the same port
    assert "Reloading..." in server.stderr
    assert server.stop(signal.SIGTERM) == 0
    assert "Stopping reloader process" in server.stderr


def test_requests_made_during_a_reload_wait_for_the_new_process(
    run: Callable[..., Running], tmp_path: Path
) -> None:
    server, url, module = start_reloading(run, tmp_path, "--port", "0")
    module.write_text(RELOADED.format(answer="number two"))
    answers: list[tuple[int, str]] = []

    def answer() -> str:
        # A new connection each time: accepted by whichever process accepts on the socket.
        response = httpx.get(f"{url}/answer", timeout=30)
        answers.append((response.status_code, response.text))
        return response.text

    until(lambda: answer() == "number two", "the edit is served")
    # The old process stopped accepting at once and the new one built its deployment before
    # its first accept: no request in between was refused or told to come back.
    assert {status for status, _ in answers} == {200}, answers
    assert server.stop(signal.SIGTERM) == 0


def test_reload_survives_a_broken_edit(run: Callable[..., Running], tmp_path: Path) -> None:
    server, url, module = start_reloading(run, tmp_path, "--port", "0")
    module.write_text("async def setup(serve:\n")
    wait_for_log(server, "a change to a file restarts it")
    assert "SyntaxError" in server.stderr
    module.write_text(RELOADED.format(answer="fixed, at last"))
    until(lambda: served_answer(url) == "fixed, at last", "the fix is served")
    assert server.stop(signal.SIGTERM) == 0


RELOADED_TOML = """
[[backends]]
tag = "hello"
target = "examples.deployment:hello"

[[endpoints]]
name = "hello"
backend = "hello"
route = "{route}"
"""


def test_reload_serves_an_edit_of_the_toml_target(
    run: Callable[..., Running], tmp_path: Path
) -> None:
    watched = tmp_path / "watched"  # no .py file here: only the TOML TARGET changes
    watched.mkdir()
    deployment = tmp_path / "reloaded.toml"
    deployment.write_text(RELOADED_TOML.format(route="/hello"))
    server = run(str(deployment), "--reload", "--reload-dir", str(watched), "--port", "0")
    url = server.url()
    assert httpx.get(f"{url}/hello").text == "hello world"
    deployment.write_text(RELOADED_TOML.format(route="/hello-again"))

    def moved() -> bool:
        try:
            return httpx.get(f"{url}/hello-again", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    until(moved, "the edited file is served")
    assert httpx.get(f"{url}/hello").status_code == 404
    assert server.stop(signal.SIGTERM) == 0


# -- --root-path -----------------------------------------------------------------------------------


def test_root_path_behind_a_proxy_that_strips_it(
    run: Callable[..., Running],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server_name: str,
) -> None:
    server = start_app(
        run, tmp_path, monkeypatch, "--port", "0", "--root-path", "/api/", "--server", server_name
    )
    url = server.url()
    # The proxy forwards https://example.com/api/where as /where.
    where = httpx.get(f"{url}/where")
    assert where.status_code == 200
    assert where.json() == {
        "root_path": "/api",
        "path": "/api/where",
        "url": f"{url}/api/where",
        "base_url": f"{url}/api/",
    }
    assert httpx.get(f"{url}/hello").text == "hello"
    wait_for_log(server, "ready on")
    assert f"ready on {url} (root_path /api, {server_name}, pid {server.proc.pid})" in server.stderr
    until(lambda: len(access_lines(server)) == 2, "two access lines")
    assert [line["target"] for line in access_lines(server)] == ["/api/where", "/api/hello"]


# -- --debug ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "debug"),
    [([], False), (["--debug"], True), (["--debug", "--workers", "2"], True)],
    ids=["default", "debug", "debug-workers"],
)
def test_debug_puts_the_traceback_in_500_bodies(
    run: Callable[..., Running],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    debug: bool,
) -> None:
    port = str(_free_port()) if "--workers" in args else "0"
    server = start_app(run, tmp_path, monkeypatch, "--port", port, *args)
    url = server.url()
    response = httpx.get(f"{url}/boom")
    assert response.status_code == 500
    assert response.text.startswith("RuntimeError: the model broke")
    assert ("Traceback (most recent call last)" in response.text) is debug
    assert ('in boom\n    raise RuntimeError("the model broke")' in response.text) is debug
    assert httpx.get(f"{url}/hello").text == "hello"


# -- the startup summary ---------------------------------------------------------------------------


def test_the_startup_summary_lists_endpoints_and_backends(run: Callable[..., Running]) -> None:
    server = run(EXAMPLE_TOML, "--port", "0")
    url = server.url()
    wait_for_log(server, "backend pid")
    found = re.search(r"INFO aioserve\.cli: (aioserve .* ready on .*\n(?:  .*\n)+)", server.stderr)
    assert found, server.stderr
    assert found.group(1).splitlines() == [
        f"aioserve {aioserve.__version__} ready on {url} (uvicorn, pid {server.proc.pid})",
        "  endpoint hello  GET       /hello  -> hello",
        "  endpoint greet  GET,POST  /greet  -> greeter-fr 50%, greeter-en 50% + shadow hello 10%",
        "  endpoint pid    GET       /pid    -> pid",
        "  backend hello       1 replica",
        "  backend greeter-fr  2 replicas",
        "  backend greeter-en  1 replica",
        "  backend pid         1 replica",
    ]
    assert server.stderr.count("ready on") == 1
    assert json.loads(httpx.get(f"{url}/pid").text) == {"pid": server.proc.pid}


def test_a_serve_instance_gets_the_access_log_and_a_summary(run: Callable[..., Running]) -> None:
    server = run("examples.deployment:app", "--port", "0")
    url = server.url()
    assert httpx.get(f"{url}/-/healthz").status_code == 200
    until(lambda: len(access_lines(server)) == 1, "the access line of /-/healthz")
    (line,) = access_lines(server)
    assert (line["method"], line["target"], line["status"], line["id"]) == (
        "GET",
        "/-/healthz",
        "200",
        "-",  # system routes give no request id
    )
    summary = f"ready on {url} (uvicorn, pid {server.proc.pid})\n  no endpoints\n  no backends\n"
    assert summary in server.stderr
