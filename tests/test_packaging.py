"""Installs that work on a fresh machine: every third-party module a package imports is declared in the extra it
runs from, each package imports from a clean virtualenv holding only its extra, and every install takes the
tested versions of constraints.txt."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
import tomllib
from pathlib import Path

import pytest

import venvs
from conftest import ROOT
from loadtest.peers import PEERS

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
PROJECT = PYPROJECT["project"]["name"]
OURS = {"contract", "service", "model_export", "loadtest", "conftest", "hf_models", "venvs"}
# The code each extra must be enough for.
USES = {"serve": ["contract.py", "service"], "export": ["contract.py", "model_export"], "load": ["loadtest"],
        "locust": ["loadtest/locustfile.py"], "dev": ["tests", "scripts"]}


PEER_SCRIPTS = {peer.script for peer in PEERS.values()}  # they run in their own virtualenvs, not in an extra
PEER_DISTRIBUTIONS = {"pytriton": "nvidia-pytriton"}  # import name -> distribution, where the two differ


def sources(names: list[str]) -> list[Path]:
    paths = [ROOT / name for name in names]
    found = [p for path in paths for p in (sorted(path.rglob("*.py")) if path.is_dir() else [path])]
    return [p for p in found if p not in PEER_SCRIPTS]


def imported(paths: list[Path]) -> set[str]:
    """Top-level names of the third-party modules these files import (at any depth of the code)."""
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in OURS}


def declared(extra: str) -> set[str]:
    """Distribution names an extra asks for, through the project's references to its own extras."""
    names = set()
    for requirement in EXTRAS[extra]:
        name, extras = re.match(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?", requirement).groups()
        if name == PROJECT:
            for inner in (extras or "").split(","):
                names |= declared(inner.strip())
        else:
            names.add(_normal(name))
    return names


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("extra", list(USES))
def test_every_imported_module_is_declared_in_its_extra(extra):
    providers = importlib.metadata.packages_distributions()
    wanted = declared(extra) | (declared("load") | declared("export") | declared("serve") if extra == "dev" else set())
    missing = {module: providers.get(module) for module in imported(sources(USES[extra]))
               if not {_normal(d) for d in providers.get(module, [module])} & wanted}
    assert not missing, f"imported but not declared in the {extra!r} extra: {missing}"


@pytest.mark.parametrize("name", list(PEERS))
def test_every_module_a_peer_imports_is_in_its_virtualenv_requirements(name):
    peer = PEERS[name]
    wanted = {_normal(re.match(r"[A-Za-z0-9_.-]+", requirement).group()) for requirement in peer.requirements}
    missing = {module for module in imported([peer.script, ROOT / "contract.py"])
               if _normal(PEER_DISTRIBUTIONS.get(module, module)) not in wanted}
    assert not missing, f"{peer.script.name} imports what its virtualenv does not install: {missing}"


def test_every_dependency_is_pinned_in_constraints():
    pinned = {_normal(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    for extra in ("serve", "export", "load", "locust", "dev"):
        assert declared(extra) <= pinned, f"{extra}: not in constraints.txt: {declared(extra) - pinned}"
    for target in ("Makefile", "Dockerfile"):
        assert "-c constraints.txt" in (ROOT / target).read_text().replace("/build/", ""), target


@pytest.fixture(scope="module")
def clean_venvs() -> dict[str, venvs.Made]:
    """The three extras' clean virtualenvs (tests/venvs.py: made side by side, or by `make test` before the tests
    started, and reused while the project's code, pyproject.toml and constraints.txt are unchanged)."""
    with ThreadPoolExecutor(len(venvs.EXTRAS)) as pool:
        return dict(zip(venvs.EXTRAS, pool.map(venvs.ensure, venvs.EXTRAS)))


@pytest.mark.slow
@pytest.mark.venv
@pytest.mark.parametrize("extra", venvs.EXTRAS)
def test_each_package_imports_from_a_clean_venv_of_its_extra(extra, clean_venvs, tmp_path):
    """What `pip install '.[extra]'` gives a new user is enough to import every module that extra is for."""
    made = clean_venvs[extra]
    assert made.returncode == 0, made.stderr[-3000:]
    modules = []
    for path in sources(USES[extra]):
        relative = path.relative_to(ROOT).with_suffix("")
        if relative.name != "locustfile":  # Locust monkey-patches at import; the locust extra's test imports it
            modules.append(".".join(relative.parts).removesuffix(".__init__"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    result = subprocess.run([str(made.python), "-c", code, *modules], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
