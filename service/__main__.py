"""``python -m service``: parse the flags and settings, then serve: one process, or ``SCS_WORKERS`` of them under a
supervisor. Exit codes: README, "Exit codes" (and ``service.server``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from . import logs
from .server import serve, stop_cleanly_until_serving
from .settings import Settings
from .workers import cpus_allowed, supervise


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of this command
        self.exit(2, f"error: {message} (see python -m service --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="python -m service", description=__doc__.splitlines()[0],
                    epilog="Every setting is also an environment variable: SCS_<NAME> (see README).")
    parser.add_argument("--model-dir", type=Path, help="models/<name> (newest version) or a version folder")
    parser.add_argument("--model-version", type=int, help="pin a version under --model-dir")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], help="onnxruntime execution provider")
    parser.add_argument("--max-batch-size", type=int, help="sentences per model run (1: batching off)")
    parser.add_argument("--workers", type=int, help="server processes (default: the CPUs this process may use)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        print(f"error: invalid settings: {problems}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    stop_cleanly_until_serving()
    workers = settings.workers or cpus_allowed()
    return supervise(settings, workers) if workers > 1 else serve(settings)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signals (while the model loads)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
