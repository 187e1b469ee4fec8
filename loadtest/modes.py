"""The service set-ups the reliability runs (overload, soak) exercise, and starting one of them for a run.

- ``on``: batching on (the defaults), one sentence per request;
- ``off``: batching off (``SCS_MAX_BATCH_SIZE=1``), one sentence per request;
- ``multi``: batching on, 8 sentences per request;
- ``workers``: batching on, one sentence per request, two worker processes (``SCS_WORKERS=2``) on every core.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .data import Body, read_sentences, request_bodies
from .processes import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
MODES: dict[str, tuple[dict[str, str], int]] = {
    "on": ({}, 1),
    "off": ({"SCS_MAX_BATCH_SIZE": "1"}, 1),
    "multi": ({}, 8),
    "workers": ({"SCS_WORKERS": "2"}, 1),
}


def bodies(mode: str, data: Path) -> list[Body]:
    return request_bodies(read_sentences(data), texts=MODES[mode][1], count=2000)


def start_service(mode: str, model_dir: Path, log: Path, env: dict[str, str] | None = None,
                  core: int | str | None = 0) -> Server:
    """``python -m service`` in ``mode`` on a free 127.0.0.1 port, pinned to ``core`` (with several workers, on
    every core); returns once it is ready. The response cache is off unless ``env`` turns it on: the runs' bodies
    repeat, and what they load is the model path."""
    settings = {"SCS_WORKERS": "1"} | MODES[mode][0] | {"SCS_LOG_LEVEL": "warning", "SCS_PROVIDER": "cpu",
                                                   "SCS_GRPC_PORT": "0", "SCS_CACHE_MAX_BYTES": "0"} | (env or {})
    if settings["SCS_WORKERS"] != "1":
        core = None
    port = free_port()
    server = Server(f"service ({mode})", [sys.executable, "-m", "service", "--model-dir", str(model_dir),
                                          "--host", "127.0.0.1", "--port", str(port)], port, settings)
    server.start(core, log)
    return server


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--modes: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    return modes
