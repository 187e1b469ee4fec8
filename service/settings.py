"""Every serving knob in one pydantic-settings object; environment variables use the ``SCS_`` prefix."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .batcher import BatchLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCS_", extra="forbid", protected_namespaces=())

    # The model
    model_dir: Path = Field(Path("models/banking77"), description="models/<name> (newest integer version) or a version folder")
    model_version: int | None = Field(None, ge=0, description="pin a version under model_dir instead of the newest")
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when onnxruntime has it, else CPU")
    intra_op_threads: int = Field(1, ge=0, description="onnxruntime intra-op threads (0: onnxruntime decides)")
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime inter-op threads (0: onnxruntime decides)")

    # Dynamic batching
    max_batch_size: int = Field(64, ge=1, description="most sentences in one model run (1 turns batching off)")
    max_batch_tokens: int = Field(4096, ge=1, description="most padded tokens (longest x count) in one model run")
    max_padding_ratio: float = Field(1.15, ge=1.0, description="padded/real tokens a batch may reach while it fills")
    max_wait_ms: float = Field(0.0, ge=0, description="wait this long for a batch to fill (0: dispatch at once)")
    max_queue_size: int = Field(4096, ge=1, description="most queued sentences; beyond it requests get 503")
    request_timeout_s: float = Field(10.0, gt=0, description="a request not answered by then gets 504; its sentences never run")

    # Requests
    max_text_chars: int = Field(2000, ge=1, description="longest text in characters (longer: 422)")
    max_texts: int = Field(64, ge=1, description="most texts in one request (more: 422)")
    max_body_bytes: int = Field(1_048_576, ge=64, description="largest request body (larger: 413, refused before parsing)")
    default_top_k: int = Field(5, ge=1, description="classes listed per prediction when the request has no top_k")

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = Field(False, description="one log line per request")
    drain_seconds: float = Field(0.0, ge=0, description="after SIGTERM, keep serving (readiness 503) this long before closing")
    graceful_timeout_s: float = Field(30.0, gt=0, description="after SIGTERM, longest wait for running requests")

    # Security (service/security.py)
    api_key: SecretStr | None = Field(None, min_length=16, description="when set, every endpoint but /healthz, "
                                      "/readyz and the docs needs `Authorization: Bearer <key>` (else 401)")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS, or * (empty: CORS off)")
    read_timeout_s: float = Field(10.0, gt=0, description="a connection must send a whole request within this "
                                  "long of opening or of its previous answer, else it is closed (slow clients)")

    def batch_limits(self) -> BatchLimits:
        return BatchLimits(**{field.name: getattr(self, field.name) for field in fields(BatchLimits)})

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_queue_size < self.max_texts:
            raise ValueError(f"max_queue_size ({self.max_queue_size}) must be >= max_texts ({self.max_texts})")
        return self
