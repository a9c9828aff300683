"""The command line: ``aioserve run`` in real subprocesses on real ports, and its error reports.

Subprocess tests wait for the "serving on" line (a bounded read), never sleep; every process is
killed (with its workers: it runs in its own session) when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from _processes import EXAMPLE_TOML, REPO, Running, _env, _free_port

from aioserve import DeploymentError, cli
from aioserve.deployment import load_deployment


def _run_to_exit(*args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = _env()
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env["PYTHONPATH"]])
    return subprocess.run(
        [sys.executable, "-m", "aioserve", "run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- serving ---------------------------------------------------------------------------------------


def test_a_setup_function_serves_until_sigterm(
    run: Callable[..., Running], server_name: str
) -> None:
    server = run(
        "examples.deployment:setup",
        *("--port", "0", "--log-level", "warning", "--server", server_name),
    )
    url = server.url()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    assert httpx.get(f"{url}/hello", params={"name": "cli"}).text == "hello cli"
    assert httpx.get(f"{url}/greet").text == "bonjour!"
    assert httpx.get(f"{url}/pid").json() == {"pid": server.proc.pid}
    assert server.stop(signal.SIGTERM) == 0
    # --log-level warning: the INFO line of the shutdown is not logged.
    assert "Shutting down" not in server.stderr
    assert "Traceback" not in server.stderr


def test_a_toml_file_serves_its_routes_until_sigint(run: Callable[..., Running]) -> None:
    server = run(EXAMPLE_TOML, "--port", "0")
    url = server.url()
    routes = httpx.get(f"{url}/-/routes").json()
    assert routes == {
        "/hello": ["hello", ["GET"]],
        "/greet": ["greet", ["GET", "POST"]],
        "/pid": ["pid", ["GET"]],
    }
    assert httpx.get(f"{url}/hello").text == "hello world"
    greetings = {httpx.post(f"{url}/greet").text for _ in range(40)}
    assert greetings == {"bonjour!", "hello."}  # traffic split 50/50 over the two backends
    assert server.stop(signal.SIGINT) == 0
    assert "INFO aioserve.cli: Shutting down (a second signal exits at once)." in server.stderr


def test_a_serve_instance_is_served_with_the_flags_address(run: Callable[..., Running]) -> None:
    server = run("examples.deployment:app", "--port", "0", "--host", "127.0.0.1")
    url = server.url()
    assert url != "http://127.0.0.1:8000"  # the instance says 8000; --port 0 replaced it
    assert httpx.get(f"{url}/-/healthz").status_code == 200
    assert httpx.get(f"{url}/-/routes").json() == {}
    assert server.stop() == 0


def test_workers_answer_from_different_processes(
    run: Callable[..., Running], server_name: str
) -> None:
    port = _free_port()
    server = run(
        "examples.deployment:setup", "--workers", "2", "--port", str(port), "--server", server_name
    )
    url = server.url()
    assert url == f"http://127.0.0.1:{port}"
    assert "with 2 worker processes" in server.stdout[-1]
    pids: set[int] = set()
    for _ in range(300):
        # httpx.get opens a new connection each time: the kernel hands it to either worker.
        pids.add(httpx.get(f"{url}/pid").json()["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, f"one process answered all 300 requests: {pids}"
    assert server.proc.pid not in pids  # the parent only manages them
    assert server.stop(signal.SIGTERM) == 0
    for pid in pids:  # the server stopped and reaped its workers before the parent exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# -- errors in subprocesses ------------------------------------------------------------------------


def test_a_bad_toml_file_exits_2_before_binding_its_port(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[backends]]\ntag = "hello"\ntarget = "examples.deployment:hello"\n'
        "[backends.config]\nnum_replicas = 0\n"
    )
    # Hold the port: a server that tried to bind it would fail with another error.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _run_to_exit(str(bad), "--port", str(port))
    assert done.returncode == 2
    assert f"{bad}:5: backends[0].config.num_replicas: num_replicas must be >= 1" in done.stderr
    assert "nothing was started" in done.stderr
    assert "bind" not in done.stderr
    assert done.stdout == ""


def test_an_error_while_building_exits_2_with_the_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "build.toml"
    bad.write_text(
        '[[backends]]\ntag = "pid"\ntarget = "examples.deployment:pid"\n\n'
        '[[backends]]\ntag = "hello"\ntarget = "examples.deployment:hello"\n'
        "config = { user_config = 4 }\n"
    )
    done = _run_to_exit(str(bad), "--port", "0")
    assert done.returncode == 2
    assert f"{bad}:5: backends[1]: Backend 'hello': user_config needs" in done.stderr
    assert done.stdout == ""  # never announced as serving


def test_an_error_while_building_in_workers_stops_them_all(tmp_path: Path) -> None:
    bad = tmp_path / "build.toml"
    bad.write_text(
        '[[backends]]\ntag = "hello"\ntarget = "examples.deployment:hello"\n'
        "config = { user_config = 4 }\n"
    )
    done = _run_to_exit(str(bad), "--workers", "2", "--port", str(_free_port()))
    assert done.returncode == 2
    assert f"{bad}:1: backends[0]: Backend 'hello': user_config needs" in done.stderr
    assert "failed to start" in done.stderr  # uvicorn stopped the parent
    assert done.stdout == ""


def test_a_port_in_use_exits_1_with_a_clear_message() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _run_to_exit("examples.deployment:setup", "--port", str(port))
    assert done.returncode == 1
    assert f"aioserve: error: The HTTP server cannot bind 127.0.0.1:{port}" in done.stderr
    assert done.stdout == ""


def test_a_setup_function_that_raises_exits_1_with_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "cli_failing_setup.py").write_text(
        "async def setup(serve):\n"
        "    await serve.create_backend('ok', 'examples.deployment:hello')\n"
        "    raise RuntimeError('the model file is missing')\n"
    )
    done = _run_to_exit("cli_failing_setup:setup", "--port", "0", path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert (
        "aioserve: error: The setup function 'cli_failing_setup:setup' raised RuntimeError: "
        "the model file is missing"
    ) in done.stderr
    assert done.stdout == ""


def test_a_bad_module_attr_exits_2() -> None:
    done = _run_to_exit("examples.deployment:hello")
    assert done.returncode == 2
    assert "'examples.deployment:hello' is a sync function" in done.stderr
    assert "async setup function" in done.stderr


# -- errors, in process (nothing starts, so nothing to clean up) ----------------------------------


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["run", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("no_such_module_xyz:setup", "Cannot load 'no_such_module_xyz:setup': Cannot import"),
        ("examples.deployment:nope", "has no attribute 'nope'"),
        ("examples.deployment:Greeter", "is the class Greeter"),
        ("examples", "must be 'module:attr' or the path of a .toml deployment file"),
        ("missing.toml", "No such deployment file: 'missing.toml'"),
        ("json:JSONDecodeError", "is the class JSONDecodeError"),
        ("os:sep", "'/' of type str"),
        ("examples.deployment:hello", "is a sync function"),
    ],
)
def test_targets_that_are_not_servable(
    capsys: pytest.CaptureFixture[str], target: str, needle: str
) -> None:
    err = _fails(capsys, target)
    assert err.startswith("aioserve: error: ")
    assert needle in err


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize(
    ("target", "needle"),
    [
        (
            "digits_app.py:setup",
            "TARGET 'digits_app.py:setup': 'digits_app.py' is a file name, not a module name: "
            "did you mean 'digits_app:setup'?",
        ),
        ("examples/deployment.py:setup", "did you mean 'examples.deployment:setup'?"),
        ("./examples/deployment.py:app", "did you mean 'examples.deployment:app'?"),
        (
            "examples/deployment.py",
            "is a file name, not 'module:attr': did you mean 'examples.deployment:app' or "
            "'examples.deployment:setup'?",
        ),
        (
            "examples.deployment",
            "names a module, not what to serve in it: did you mean 'examples.deployment:app' or "
            "'examples.deployment:setup'?",
        ),
        ("examples.deployment.setup", "did you mean 'examples.deployment:setup'?"),
        (
            "examples.deployment:stup",
            "Module 'examples.deployment' has no attribute 'stup'. Did you mean 'setup'?",
        ),
        (
            "examples.deploymnt:setup",
            f"there is no module 'deploymnt' in package 'examples' "
            f"({str(REPO / 'examples')!r}). Did you mean 'deployment'?",
        ),
        (
            "exampels.deployment:setup",
            f"there is no module 'exampels' in the current directory {str(REPO)!r} nor "
            f"elsewhere on sys.path. Did you mean 'examples'?",
        ),
        (
            "examples.deployment:hello",
            'create it in a setup function: await serve.create_backend("hello", hello)',
        ),
        (
            "examples.deployment:Greeter",
            "'examples.deployment' has 'examples.deployment:app', 'examples.deployment:setup'.",
        ),
        ("os:sep", "'aioserve run' serves a Serve instance ('module:app'), an async setup"),
    ],
)
def test_a_target_that_does_not_load_says_how_to_fix_it(
    capsys: pytest.CaptureFixture[str], target: str, needle: str
) -> None:
    err = _fails(capsys, target)
    assert err.startswith("aioserve: error: ")
    assert needle in err
    assert "Traceback" not in err  # the user's mistake, not a failure in their code


def test_a_file_outside_the_current_directory_says_where_to_run_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "outside_mod.py").write_text("async def setup(serve):\n    pass\n")
    err = _fails(capsys, f"{tmp_path}/outside_mod.py:setup")
    assert f"did you mean 'outside_mod:setup', run from {str(tmp_path)!r}" in err


@pytest.mark.usefixtures("in_repo")
def test_a_module_whose_own_import_fails_shows_where(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cli_needs_dep.py").write_text(
        "import json\nimport not_installed_dep_xyz\n\nasync def setup(serve):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _fails(capsys, "cli_needs_dep:setup")
    assert (
        "aioserve: error: Cannot load 'cli_needs_dep:setup': Cannot import module "
        "'cli_needs_dep' of 'cli_needs_dep:setup': No module named 'not_installed_dep_xyz'"
    ) in err
    # The module exists: the error is in it, and the traceback shows the line.
    assert "Traceback" in err
    assert 'cli_needs_dep.py", line 2' in err


@pytest.mark.usefixtures("in_repo")
def test_an_asgi_app_is_not_a_target_and_the_error_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cli_fastapi_app.py").write_text("from fastapi import FastAPI\n\napi = FastAPI()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _fails(capsys, "cli_fastapi_app:api")
    assert "'cli_fastapi_app:api' is an ASGI application (FastAPI)." in err
    assert "mount a Serve's asgi_app in it" in err


def test_a_file_name_for_a_module_exits_2_before_importing() -> None:
    done = _run_to_exit("digits_app.py:setup")
    assert done.returncode == 2
    assert "did you mean 'digits_app:setup'?" in done.stderr
    assert done.stdout == ""


@pytest.mark.usefixtures("in_repo")
def test_a_setup_function_must_take_the_instance(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cli_target_no_arg.py").write_text("async def setup():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _fails(capsys, "cli_target_no_arg:setup")
    assert "must take one argument, the Serve instance" in err


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--workers", "2", "--port", "0"], "--port 0 cannot be used with --workers"),
        (["--workers", "2", "--port", "9", "--kv-store-path", "s.db"], "overwrite each other"),
        (["--workers", "0"], "--workers: must be >= 1"),
        (["--port", "70000"], "--port: must be in 0..65535"),
        (["--log-level", "loud"], "invalid choice: 'loud'"),
        (["--root-path", "api"], "--root-path: must be '' or start with '/', got 'api'"),
        (["--reload", "--workers", "2", "--port", "9"], "--reload cannot be used with --workers 2"),
        (["--reload-dir", "examples"], "--reload-dir applies only with --reload"),
        (["--reload", "--reload-dir", "no/such/dir"], "--reload-dir 'no/such/dir' is not a dir"),
    ],
)
def test_bad_options(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert needle in _fails(capsys, EXAMPLE_TOML, *argv)


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_server_granian_without_the_extra_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    monkeypatch.setitem(sys.modules, "granian", None)  # import granian raises ImportError
    err = _fails(capsys, EXAMPLE_TOML, "--server", "granian", "--workers", workers, "--port", "9")
    assert "The HTTP server 'granian' is not installed: pip install 'aioserve[granian]'" in err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: aioserve" in capsys.readouterr().err


BAD_FILE = """\
colour = "blue"
[http]
port = 99999

[[backends]]
tag = "hello"
target = "examples.deployment:hello"
init_args = "nope"
[backends.config]
num_replicas = 0
max_batch_sise = 2

[[backends]]
target = "examples.deployment:nothing"
config = { num_replicas = -1, "max_queued_queries" = 0 }

[[backends]]
tag = "hello"
target = "os:sep"

[[endpoints]]
name = "e"
backend = "ghost"
route = "nope"
methods = []
traffic = { hello = 0.5, ghost = 0.5 }
shadows = { hello = 2 }

[[endpoints]]
name = "e"
route = "/e"
traffic = { hello = 0.7 }

[[endpoints]]
name = "f"
route = "/e"
methods = ["GET", 3]
"""


@pytest.mark.usefixtures("in_repo")
def test_every_error_of_a_file_is_reported_with_its_key_path_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_FILE)
    lines = _fails(capsys, str(path)).splitlines()
    assert lines[0] == f"aioserve: error: {path} has 21 errors; nothing was started."
    found = {re.sub(r"^.*?\.toml:", "", line).split(": ", 2)[1]: line for line in lines[1:]}
    expected_lines = {
        "colour": 1,
        "http.port": 3,
        "backends[0].init_args": 8,
        "backends[0].config.num_replicas": 10,
        "backends[0].config.max_batch_sise": 11,
        "backends[1]": 13,
        "backends[1].target": 14,
        "backends[1].config.num_replicas": 15,
        "backends[1].config.max_queued_queries": 15,
        "backends[2].tag": 18,
        "backends[2].target": 19,
        "endpoints[0].route": 24,
        "endpoints[0].backend": 23,
        "endpoints[0].methods": 25,
        "endpoints[0].traffic": 26,
        "endpoints[0].traffic.ghost": 26,
        "endpoints[0].shadows.hello": 27,
        "endpoints[1].name": 30,
        "endpoints[1].traffic": 32,
        "endpoints[2].route": 36,
        "endpoints[2].methods": 37,
    }
    for key, line in expected_lines.items():
        assert key in found, f"no error for {key}: {lines}"
        assert found[key].startswith(f"{path}:{line}: {key}: "), found[key]
    assert len(found) == len(expected_lines) == 21
    messages = "\n".join(lines)
    for needle in [
        "unknown key 'colour'. Known keys here: http, backends, endpoints.",
        "port must be in 0..65535, got 99999.",
        "must be an array, got a string.",
        "num_replicas must be >= 1, got 0.",
        "Unknown backend config field 'max_batch_sise'.",
        "missing required key 'tag'",
        "backend tag 'hello' is already used by backends[0].",
        "'os:sep' is '/' of type str, not a function or a class.",
        "no backend tagged 'ghost' in this file. Backends: 'hello'.",
        "give either 'backend' or 'traffic', not both.",
        "A shadow proportion must be between 0 and 1, got 2.",
        "endpoint name 'e' is already used by endpoints[0].",
        "Traffic weights must sum to 1, got 0.7",
        "route '/e' is already used by endpoints[1].",
    ]:
        assert needle in messages


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[http]\nport = "80"\n', ":2: http.port: http_options port must be an int"),
        ("[[endpoints]]\nname = 'x'\nmethods = ['GET', 3]\n", ":3: endpoints[0].methods: must"),
        (
            "[[endpoints]]\nname = 'x'\nroute = '/a'\n[[endpoints]]\nname = 'y'\nroute = '/a'\n",
            ":6:",
        ),
        ("[[endpoints]]\nname = 'x'\ntraffic = { }\n", ":3: endpoints[0].traffic: Traffic must"),
        ("[[endpoints]]\nname = 'x'\ntraffic = 1\n", ":3: endpoints[0].traffic: must be a table"),
        ("[[endpoints]]\nname = 'x'\nshadows = []\n", ":3: endpoints[0].shadows: must be a table"),
        ("backends = 3\n", ":1: backends: must be an array of tables"),
        ("http = 3\n", ":1: http: must be a table ([http])"),
        ("[[backends]]\ntag = ''\ntarget = 'json:dumps'\n", ":2: backends[0].tag: must be a non"),
        (
            "[[backends]]\ntag = 't'\ntarget = 'json:dumps'\nconfig = 'fast'\n",
            ":4: backends[0].config: must be a table, got a string.",
        ),
        (
            "[[backends]]\ntag = 't'\ntarget = 'json:dumps'\nconfig.user_config = 1\n"
            "config.sleepy = true\n",
            ":5: backends[0].config.sleepy: Unknown backend config field 'sleepy'.",
        ),
        (
            '[[backends]]\ntag = "t"\ntarget = "json:dumps"\n[[endpoints]]\nname = "x"\n'
            '[endpoints.shadows]\n"t" = 0.5\nmissing = 0.5\n',
            ":8: endpoints[0].shadows.missing: no backend tagged 'missing' in this file.",
        ),
        ("a = [\n  1,\nb = 2\n", ":3: invalid TOML: "),
        ('"""\n', ":1: invalid TOML: "),
    ],
)
def test_key_paths_and_lines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "d.toml"
    path.write_text(text)
    err = _fails(capsys, str(path))
    assert f"{path}{expected}" in err, err


def test_lines_are_found_past_multiline_strings_and_in_nested_arrays(tmp_path: Path) -> None:
    path = tmp_path / "nested.toml"
    path.write_text(
        'doc = """\n'
        "[[backends]]\n"  # inside the string: not a header
        'name = "fake"\n'
        '"""\n'
        "[[backends]]\n"
        'tag = "a"\n'
        'target = "json:dumps"\n'
        "[backends.config]\n"
        "user_config = { a = 1 }\n"
        "num_replicas = 0\n"
        "[[backends]]\n"
        'tag = "b"\n'
        'target = "json:dumps"\n'
        "[[backends.items]]\n"
        "[[backends.items]]\n"
        "x = 1\n"
        "[[endpoints]]\n"
        'name = "e"\n'
        'traffic = { "my tag" = 1.0 }\n'
    )
    with pytest.raises(DeploymentError) as caught:
        load_deployment(path)
    located = [line.split(": ", 2)[:2] for line in caught.value.errors]
    assert located == [
        [f"{path}:1", "doc"],
        [f"{path}:10", "backends[0].config.num_replicas"],
        [f"{path}:14", "backends[1].items"],
        [f"{path}:19", 'endpoints[0].traffic."my tag"'],
    ]


@pytest.mark.usefixtures("in_repo")
def test_the_example_file_is_valid() -> None:
    deployment = load_deployment(EXAMPLE_TOML)
    state = deployment.state
    assert list(state.backends) == ["hello", "greeter-fr", "greeter-en", "pid"]
    assert list(state.endpoints) == ["hello", "greet", "pid"]
    assert state.endpoints["greet"].traffic == {"greeter-fr": 0.5, "greeter-en": 0.5}
    assert deployment.http == {"host": "127.0.0.1", "port": 8000}
    assert json.loads(json.dumps(state.backends["greeter-fr"].config)) == {
        "num_replicas": 2,
        "user_config": {"punctuation": "!"},
    }
