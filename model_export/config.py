"""Every training hyperparameter in one place; a JSON or TOML file and CLI flags override the defaults."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UserError


@dataclass
class TrainConfig:
    seed: int = 0
    vocab_size: int = 4000
    max_length: int = 64
    embedding_dim: int = 256
    hidden_size: int = 256
    bidirectional: bool = True
    dropout: float = 0.3
    embedding_dropout: float = 0.1
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    validation_fraction: float = 0.1
    patience: int = 5
    threads: int = 2
    calibrate: bool = True  # temperature scaling on the validation split (model_export/calibration.py)

    def to_dict(self) -> dict:
        return asdict(self)


def read_mapping(path: str | Path, what: str) -> dict:
    """A JSON or TOML file (by suffix) holding one mapping; ``what`` names it in the one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot parse {what} ({error})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: {what} must be a mapping of hyperparameters")
    return values


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Defaults, then the file's values, then non-None ``overrides``; unknown keys are an error."""
    values: dict = read_mapping(path, "config") if path is not None else {}
    values |= {key: value for key, value in overrides.items() if value is not None}
    known = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown hyperparameter(s): {', '.join(unknown)}; known: {', '.join(known)}")
    config = TrainConfig()
    for key, value in values.items():
        default = getattr(config, key)
        try:
            value = type(default)(value) if not isinstance(default, bool) else _as_bool(key, value)
        except (TypeError, ValueError):
            raise UserError(f"hyperparameter {key}: expected {type(default).__name__}, got {value!r}") from None
        setattr(config, key, value)
    _validate(config)
    return config


def _as_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in {"1", "true", "yes"}:
        return True
    if str(value).lower() in {"0", "false", "no"}:
        return False
    raise ValueError(key)


def _validate(config: TrainConfig) -> None:
    positive = ["vocab_size", "max_length", "embedding_dim", "hidden_size", "epochs", "batch_size", "threads"]
    for key in positive:
        if getattr(config, key) < 1:
            raise UserError(f"hyperparameter {key} must be >= 1, got {getattr(config, key)}")
    if not 0 < config.validation_fraction < 1:
        raise UserError(f"validation_fraction must be between 0 and 1, got {config.validation_fraction}")
    for key in ["dropout", "embedding_dropout", "label_smoothing"]:
        if not 0 <= getattr(config, key) < 1:
            raise UserError(f"hyperparameter {key} must be in [0, 1), got {getattr(config, key)}")
    if config.learning_rate <= 0:
        raise UserError(f"learning_rate must be > 0, got {config.learning_rate}")
