"""Import paths (``"package.module:Name"``) that do not import say how to fix them, for backends
given by import path as for ``aioserve run``."""

from __future__ import annotations

from pathlib import Path

import pytest

import aioserve
from aioserve import ConfigError, Serve
from aioserve._importer import import_attr

SAMPLES = Path(__file__).parent


def test_a_good_path_imports_the_object() -> None:
    assert import_attr("aioserve:Serve") is Serve
    assert import_attr("aioserve.Serve") is Serve
    assert import_attr("aioserve:Serve.start") is Serve.start


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("_sample_backends.py:Greeter", "did you mean '_sample_backends:Greeter'?"),
        ("_sample_backends:Greter", "has no attribute 'Greter'. Did you mean 'Greeter'"),
        ("_sample_backnds:Greeter", "there is no module '_sample_backnds' in the current"),
        ("aioserve.srve:Serve", "there is no module 'srve' in package 'aioserve'"),
        ("aioserve.srve:Serve", "Did you mean 'serve'"),
        ("aioserve:Srve", "Did you mean 'Serve'"),  # named in the package's __all__
        ("aioserve:Serve.strat", "has no attribute 'Serve.strat'. Did you mean 'stat' or 'start'?"),
    ],
)
def test_a_bad_path_says_what_was_meant(
    monkeypatch: pytest.MonkeyPatch, path: str, needle: str
) -> None:
    monkeypatch.chdir(SAMPLES)
    monkeypatch.syspath_prepend(str(SAMPLES))
    with pytest.raises(ConfigError) as caught:
        import_attr(path)
    assert needle in str(caught.value)
    assert caught.value.__cause__ is None  # nothing worth chaining: the path names nothing


def test_nothing_near_lists_the_few_names_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "few_names.py").write_text(
        "import json\nfrom json import dumps\n\ndef alpha(): ...\nclass Beta: ...\nGAMMA = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        import_attr("few_names:zzz")
    # Callables defined there; not what the module imported, nor the constant.
    assert str(caught.value) == "Module 'few_names' has no attribute 'zzz'. It has 'Beta', 'alpha'."


def test_an_import_failing_inside_the_module_is_chained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_dep.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="No module named 'not_installed_dep_xyz'") as caught:
        import_attr("broken_dep:thing")
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


async def test_a_backend_given_by_a_file_name_says_what_was_meant(serve: Serve) -> None:
    with pytest.raises(ValueError, match=r"did you mean 'pkg\.models:Model'\?"):
        await serve.create_backend("model", "pkg/models.py:Model")
    assert serve.list_backends() == {}
    assert isinstance(aioserve.ConfigError("x"), ValueError)


def test_a_file_under_a_directory_that_is_no_module_name_is_run_from_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    code = tmp_path / "my-project"  # a hyphen: "my-project.app" cannot be imported
    code.mkdir()
    (code / "app.py").write_text("setup = None\n")
    with pytest.raises(ConfigError) as caught:
        import_attr("my-project/app.py:setup")
    assert f"did you mean 'app:setup', run from {str(code)!r}" in str(caught.value)
