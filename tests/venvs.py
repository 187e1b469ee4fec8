"""The virtualenvs some tests need besides .venv: each made once, then reused until what it installs changes.

    python tests/venvs.py [NAME ...]      # make them (default: all), side by side; `make test` starts this first

- ``serve``, ``load``, ``export``: a copy of the project installed with that extra alone into a clean virtualenv
  (tests/test_packaging.py imports every module the extra is for from it);
- ``kserve``: the kserve package's REST client, whose pins clash with the project's (tests/test_service_v2.py);
- ``litserve``, ``pytriton``: the peers ``loadtest.bench --peers`` measures, in artifacts/peers/ where the harness
  keeps them (the --peers test in tests/test_loadtest.py).

Each is made under a lock file: a test that needs one while this script is still making it waits for it instead of
making it twice, and a test that finds one missing or stale makes it itself, so any test also runs alone. pip
mostly waits on the disk and the network, which is why `make test` makes these while the test artifact trains and
the other tests run. Nothing here fails the caller: a failed install is recorded (exit code, stderr) and the test
that uses the virtualenv reports it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "artifacts" / "test-venvs"
EXTRAS = ("serve", "load", "export")  # installed alone from a copy of the project
COPIED = ("pyproject.toml", "README.md", "contract.py", "service", "model_export", "loadtest")  # what the copy holds
KSERVE = ["kserve==0.21.0"]
PEER_NAMES = ("litserve", "pytriton")
NAMES = (*EXTRAS, "kserve", *PEER_NAMES)


@dataclass(frozen=True)
class Made:
    python: Path
    returncode: int
    stderr: str


@contextmanager
def locked(path: Path):
    """An exclusive lock held while a virtualenv is checked or made (other processes wait on it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fingerprint(parts: list[str], paths: list[Path]) -> str:
    digest = hashlib.sha256("\n".join([sys.version, *parts]).encode())
    for path in paths:  # a folder counts by its Python files: what a venv imports from it
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _copy_project(source: Path) -> None:
    """A copy of what `pip install '.[extra]'` reads (setuptools writes build/ into what it builds)."""
    source.mkdir(parents=True)
    for name in COPIED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, source / name)


def ensure(name: str) -> Made:
    """The virtualenv ``name`` (see the module's docstring), made first when missing or stale."""
    if name in PEER_NAMES:
        return _peer(name)
    folder = HOME / name
    if name in EXTRAS:
        wanted = _fingerprint([name, (ROOT / "constraints.txt").read_text()], [ROOT / p for p in COPIED])
    elif name == "kserve":
        wanted = _fingerprint(KSERVE, [])
    else:
        raise ValueError(f"unknown virtualenv {name!r}: choose from {', '.join(NAMES)}")
    record, python = folder / "made.json", folder / "venv" / "bin" / "python"
    with locked(HOME / f"{name}.lock"):
        if record.is_file() and python.is_file():
            made = json.loads(record.read_text())
            if made["fingerprint"] == wanted and made["returncode"] == 0:
                return Made(python, 0, "")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True, timeout=120)
        if name in EXTRAS:
            _copy_project(folder / "source")
            wanted_packages = ["-c", str(ROOT / "constraints.txt"), f"{folder / 'source'}[{name}]"]
        else:
            wanted_packages = KSERVE
        # --no-compile: Python compiles what a test imports when it imports it; compiling everything up front is
        # about 30,000 files for these six virtualenvs, some 2 ms of CPU each (measured: 6.4 s for serve's 3,000).
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                  "--no-compile", *wanted_packages], capture_output=True, text=True, timeout=900)
        record.write_text(json.dumps({"fingerprint": wanted, "returncode": install.returncode,
                                      "stderr": install.stderr[-6000:]}))
        return Made(python, install.returncode, install.stderr[-6000:])


def _peer(name: str) -> Made:
    """A peer's virtualenv, made by the harness itself (``loadtest.peers.python_for``, under its own lock)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from loadtest.peers import PEERS, python_for

    try:
        return Made(python_for(PEERS[name], say=lambda _: None), 0, "")
    except (RuntimeError, subprocess.SubprocessError, OSError) as error:
        return Made(Path(), 1, str(error))


def main(argv: list[str]) -> int:
    names = argv or list(NAMES)
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        print(f"error: unknown virtualenv(s) {', '.join(unknown)}: choose from {', '.join(NAMES)}", file=sys.stderr)
        return 2
    started = time.monotonic()

    def one(name: str) -> str:
        began = time.monotonic()
        made = ensure(name)
        state = "ready" if made.returncode == 0 else f"FAILED (the test that uses it will say why): {made.stderr[-300:]}"
        return f"{name}: {state} ({time.monotonic() - began:.0f} s)"

    with ThreadPoolExecutor(len(names)) as pool:  # pip mostly waits on the disk and the network
        for line in pool.map(one, names):
            print(line, flush=True)
    print(f"test virtualenvs: {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
