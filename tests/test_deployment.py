"""Declarative deployments in process: loading and checking a TOML file, and applying it to a
``Serve``. The command line's reports of the same errors are tested in test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from aioserve import BackendError, ConfigError, DeploymentError, Serve
from aioserve.deployment import Deployment, load_deployment
from aioserve.state import BackendRecord, ControlState, EndpointRecord

GOOD = """\
[http]
root_path = "/api"

[[backends]]
tag = "greeter"
target = "_sample_backends:Greeter"
init_args = ["bonjour"]
[backends.config]
num_replicas = 2

[[backends]]
tag = "shout"
target = "_sample_backends:shout"

[[endpoints]]
name = "greet"
route = "/greet"
methods = ["GET", "POST"]
traffic = { greeter = 0.25, shout = 0.75 }
shadows = { shout = 0.5 }

[[endpoints]]
name = "shout"
backend = "shout"
"""


def test_a_valid_text_is_what_to_create_in_file_order() -> None:
    deployment = Deployment(GOOD, source="good.toml")
    assert deployment.source == "good.toml"
    assert deployment.http == {"root_path": "/api"}
    assert deployment.state == ControlState(
        backends={
            "greeter": BackendRecord(
                "greeter", "_sample_backends:Greeter", ["bonjour"], {"num_replicas": 2}
            ),
            "shout": BackendRecord("shout", "_sample_backends:shout", [], {}),
        },
        endpoints={
            "greet": EndpointRecord(
                "greet",
                "/greet",
                ["GET", "POST"],
                {"greeter": 0.25, "shout": 0.75},
                {"shout": 0.5},
            ),
            # One backend is all of the traffic.
            "shout": EndpointRecord("shout", None, ["GET"], {"shout": 1.0}, {}),
        },
    )
    assert list(deployment.state.backends) == ["greeter", "shout"]  # file order
    assert repr(deployment) == "<Deployment 'good.toml': 2 backends, 2 endpoints>"


def test_every_item_carries_where_it_was_declared() -> None:
    state = Deployment(GOOD, source="good.toml").state
    assert state.backends["greeter"].origin == "good.toml:4: backends[0]"
    assert state.backends["shout"].origin == "good.toml:11: backends[1]"
    greet, shout = state.endpoints["greet"], state.endpoints["shout"]
    assert greet.origin == "good.toml:15: endpoints[0]"
    assert greet.traffic_origin == "good.toml:19: endpoints[0].traffic"
    assert greet.shadow_origins == {"shout": "good.toml:20: endpoints[0].shadows.shout"}
    assert shout.traffic_origin == "good.toml:24: endpoints[1].backend"


def test_an_empty_text_is_an_empty_deployment() -> None:
    deployment = Deployment("")
    assert (deployment.http, deployment.state) == ({}, ControlState())
    assert deployment.source == "<deployment>"


def test_every_error_is_listed_with_its_line_and_key_path() -> None:
    text = '[http]\nport = -1\n\n[[backends]]\ntag = "t"\n\n'
    text += '[[endpoints]]\nname = "e"\nbackend = "x"\n'
    with pytest.raises(DeploymentError) as caught:
        Deployment(text, source="bad.toml")
    error = caught.value
    assert error.errors == (
        "bad.toml:2: http.port: http_options port must be in 0..65535, got -1.",
        "bad.toml:4: backends[0]: missing required key 'target' (a non-empty string).",
        "bad.toml:9: endpoints[0].backend: no backend tagged 'x' in this file. Backends: 't'.",
    )
    assert str(error) == "\n".join(["bad.toml has 3 errors; nothing was started.", *error.errors])
    # A bad file is a configuration error, caught as such or as a ValueError.
    assert isinstance(error, ConfigError)
    assert isinstance(error, ValueError)


def test_one_error_is_counted_in_the_singular() -> None:
    with pytest.raises(DeploymentError) as caught:
        Deployment("colour = 1\n", source="one.toml")
    assert str(caught.value).splitlines() == [
        "one.toml has 1 error; nothing was started.",
        "one.toml:1: colour: unknown key 'colour'. Known keys here: http, backends, endpoints.",
    ]


def test_keys_of_inline_tables_and_arrays_are_located() -> None:
    text = '[[backends]]\ntag = "t"\ntarget = "json:dumps"\n'
    text += '[[endpoints]]\nname = "e"\nshadows = { t = 3 }\n'
    with pytest.raises(DeploymentError) as caught:
        Deployment(text, source="s.toml")
    assert caught.value.errors[0].startswith("s.toml:6: endpoints[0].shadows.t: ")
    with pytest.raises(DeploymentError) as caught:
        Deployment("backends = [1]\n", source="s.toml")
    assert caught.value.errors == (
        "s.toml:1: backends: must be an array of tables ([[backends]] sections), got an array.",
    )


def test_invalid_toml_is_one_error_at_its_line() -> None:
    with pytest.raises(DeploymentError) as caught:
        Deployment("a = 1\nb = \n", source="t.toml")
    (line,) = caught.value.errors
    assert line.startswith("t.toml:2: invalid TOML: ")
    assert str(caught.value) == line


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD, encoding="utf-8")
    deployment = load_deployment(path)
    assert deployment.source == str(path)
    assert list(deployment.state.backends) == ["greeter", "shout"]


def test_load_reports_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(DeploymentError) as caught:
        load_deployment(missing)
    assert str(caught.value) == f"No such deployment file: {missing!r}."
    assert caught.value.errors == ()

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(DeploymentError, match=r"^Cannot read the deployment file .*binary\.toml"):
        load_deployment(binary)
    with pytest.raises(DeploymentError, match="Cannot read the deployment file"):
        load_deployment(tmp_path)  # a directory


async def test_apply_creates_backends_endpoints_traffic_and_shadows(serve: Serve) -> None:
    await Deployment(GOOD, source="good.toml").state.apply(serve)
    assert list(serve.list_backends()) == ["greeter", "shout"]
    assert serve.get_backend_config("greeter").num_replicas == 2
    endpoints = serve.list_endpoints()
    assert endpoints["greet"]["traffic"] == {"greeter": 0.25, "shout": 0.75}
    assert endpoints["greet"]["shadows"] == {"shout": 0.5}
    assert endpoints["shout"]["traffic"] == {"shout": 1.0}
    assert await serve.get_handle("shout").remote("hi") == "HI"


async def test_the_http_table_configures_a_serve() -> None:
    # location is not a key of the file's [http] table (the command line decides it) ...
    with pytest.raises(DeploymentError, match=r"http\.location: unknown key 'location'"):
        Deployment('[http]\nlocation = "NoServer"\n')
    # ... and what the table holds is valid HTTPOptions.
    http = Deployment(GOOD).http
    async with Serve(http_options={**http, "location": "NoServer"}) as serve:
        assert serve.http_options.root_path == "/api"


async def test_a_step_serve_refuses_is_located_with_serves_error_as_cause(serve: Serve) -> None:
    text = (
        '[[backends]]\ntag = "ok"\ntarget = "_sample_backends:shout"\n\n'
        '[[backends]]\ntag = "broken"\ntarget = "_sample_backends:Greeter"\n'
        'init_args = ["a", "b"]\n'
    )
    with pytest.raises(DeploymentError) as caught:
        await Deployment(text, source="b.toml").state.apply(serve)
    error = caught.value
    assert isinstance(error.__cause__, BackendError)
    (line,) = error.errors
    assert line == str(error)
    assert line.startswith("b.toml:5: backends[1]: The constructor of backend 'broken'")
    # What was created before the failing step stays; the caller decides what to do with it.
    assert list(serve.list_backends()) == ["ok"]


async def test_a_name_taken_on_the_instance_is_located_at_its_table(serve: Serve) -> None:
    text = (
        '[[backends]]\ntag = "t"\ntarget = "_sample_backends:shout"\n'
        '[[endpoints]]\nname = "e"\nbackend = "t"\nshadows = { t = 0.5 }\n'
    )
    deployment = Deployment(text, source="s.toml")
    await serve.create_endpoint("e")
    with pytest.raises(DeploymentError) as caught:
        await deployment.state.apply(serve)
    assert isinstance(caught.value.__cause__, ConfigError)
    assert str(caught.value).startswith("s.toml:4: endpoints[0]: ")


def test_an_endpoint_without_a_name_is_an_error_and_not_created() -> None:
    with pytest.raises(DeploymentError) as caught:
        Deployment('[[endpoints]]\nroute = "/x"\n', source="n.toml")
    assert caught.value.errors == (
        "n.toml:1: endpoints[0]: missing required key 'name' (a non-empty string).",
    )


def test_quoted_and_literal_keys_are_located() -> None:
    # Keys are decoded by tomllib itself, \U escapes included.
    text = "\"\\U0001F600\" = 1\n'a.b' = 2\n"
    with pytest.raises(DeploymentError) as caught:
        Deployment(text, source="k.toml")
    assert caught.value.errors[0].startswith('k.toml:1: "\\ud83d\\ude00": unknown key')
    assert caught.value.errors[1].startswith("k.toml:2: \"a.b\": unknown key 'a.b'.")
