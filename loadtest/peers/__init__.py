"""Peer frameworks, each serving the same ONNX model the same way, in a virtualenv of its own the harness makes.

Both run the artifact with one onnxruntime thread, tokenize with its ``contract.Encoder`` and pad each batch only
to its longest sentence (``contract.inputs``); what differs is the framework around the model:
- ``litserve``: LitServe with its own batching (batches of up to 32, 5 ms timeout), ``POST /classify``.
- ``pytriton``: PyTriton, a real Triton Inference Server with its dynamic batcher (batches of up to 64) in front
  of the same Python callable, the Open Inference Protocol (``POST /v2/models/<name>/infer``).
Their venvs live in ``artifacts/peers/`` and are made again when their requirements change.
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# What the peers' callables import from the project (contract.py), at the versions this project tests.
CONTRACT_DEPS = ["onnxruntime==1.32.0", "tokenizers==0.23.3", "pydantic==2.14.4"]


@dataclass(frozen=True)
class Peer:
    name: str
    title: str
    requirements: list[str]
    script: Path
    protocol: str  # the request bodies it takes: "classify" or "v2"
    ready_path: str  # "{model}" stands for the model's name
    # False: left running between its points. Triton's Python backend crashed (segfault in
    # TRITONBACKEND_ModelInstanceExecute, then boost::interprocess::lock_exception) in a run where it was frozen
    # (SIGSTOP) and resumed between points, so it is not frozen.
    pausable: bool = True


PEERS = {
    "litserve": Peer("litserve", "LitServe 0.2.19, batches of 32 / 5 ms",
                     ["litserve==0.2.19", "numpy==2.4.6", *CONTRACT_DEPS],
                     HERE / "litserve_app.py", "classify", "/health"),
    "pytriton": Peer("pytriton", "PyTriton 0.7.0 (Triton, dynamic batching up to 64)",
                     ["nvidia-pytriton==0.7.0", "numpy<2", *CONTRACT_DEPS], HERE / "pytriton_app.py", "v2",
                     "/v2/models/{model}/ready", pausable=False),
}


def python_for(peer: Peer, say=print) -> Path:
    """The peer's virtualenv interpreter, made (or remade, when its requirements changed) first. Made under a lock
    file, so two processes that need it at once (a run and tests/venvs.py) make it once."""
    venv = ROOT / "artifacts" / "peers" / peer.name
    stamp = venv / ".requirements"
    wanted = hashlib.sha256("\n".join(peer.requirements).encode()).hexdigest()
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{peer.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted and python.is_file():
            return python
        say(f"{peer.name}: making its virtualenv in {venv.relative_to(ROOT)} ({', '.join(peer.requirements)})")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-compile", *peer.requirements], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{peer.name}: pip install failed: {done.stderr.strip()[-400:]}")
        stamp.write_text(wanted)
        return python
