"""Checks of an output folder, torch-free: the CLI refuses a bad ``--out`` before it imports torch or trains."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import UserError


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse, before any training, an ``--out`` that exists (without ``--force``) or cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: already exists and is not empty (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".probe-", dir=out.parent)).rmdir()
    except OSError as error:
        raise UserError(f"--out {out}: cannot write there ({error.strerror or error})") from None
