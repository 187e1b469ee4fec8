"""Every serving knob in one pydantic-settings object; environment variables use the ``SCS_`` prefix."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .batcher import BatchLimits


@dataclass(frozen=True)
class VersionPolicy:
    kind: str  # "latest", "all" or "specific"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        found = re.fullmatch(r"\s*(latest)(?::([0-9]{1,9}))?\s*|\s*(all)\s*|\s*(specific):([0-9]{1,18}(?:,[0-9]{1,18})*)\s*",
                             text)
        if not found:
            raise ValueError(f"version policy {text!r}: expected latest, latest:N, all or specific:1,2")
        if found.group(1):
            count = int(found.group(2) or 1)
            if count < 1:
                raise ValueError(f"version policy {text!r}: latest:N needs N >= 1")
            return cls("latest", count)
        if found.group(3):
            return cls("all")
        return cls("specific", versions=tuple(sorted({int(v) for v in found.group(5).split(",")})))

    def select(self, available: list[int]) -> list[int]:
        if self.kind == "latest":
            return available[-self.count:]
        if self.kind == "all":
            return available
        return [v for v in self.versions if v in available]

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        return "all" if self.kind == "all" else "specific:" + ",".join(map(str, self.versions))


def _checked_url(value: str, name: str) -> str:
    if value and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
        raise ValueError(f"{name}={value!r} is not an http:// or https:// URL (e.g. http://collector:4318)")
    return value


def _traces_url(base: str) -> str:
    """A collector's base URL -> its OTLP/HTTP traces URL (unless it names that path already)."""
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


# Provisional: not yet measured on a GPU (no session has had one). `python -m loadtest.gpu_check` measures the
# candidates (--batching) on the GPU machine; replace these with its winner and cite the run in README.
CUDA_BATCH_DEFAULTS: dict[str, int | float] = {"max_batch_size": 256, "max_batch_tokens": 16384}


def _per_level(text: str, name: str, levels: int) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected comma-separated numbers, one per priority level") from None
    if len(values) != levels:
        raise ValueError(f"{name}={text!r}: {len(values)} values for {levels} priority levels (SCS_PRIORITY_LEVELS)")
    return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCS_", extra="forbid", protected_namespaces=())

    # The models
    model_dir: Path = Field(Path("models"), description="a model repository (models/<name>/<version>/), one model "
                            "folder (models/<name>) or one version folder")
    models: str = Field("", description="comma-separated: serve only these models of the repository (each must load)")
    default_model: str = Field("", description="the model a request without `model` gets (default: the first by name)")
    version_policy: str = Field("latest:1", description="versions served per model: latest:N, all, or specific:1,2 "
                                "(a model folder's model.json may set its own)")
    model_version: int | None = Field(None, ge=0, description="serve only this version (one model)")
    repository_poll_s: float = Field(0.0, ge=0, description="look for new or removed versions this often (0: never)")
    allow_repository_control: bool = Field(False, description="without SCS_API_KEY, allow the V2 repository "
                                           "load/unload API anyway (with a key it is always allowed, to key holders)")
    shadow_share: float = Field(0.1, gt=0, le=1, description="share of live requests a candidate in shadow also "
                                "answers, after the live answer (a rollout policy's shadow.share overrides it)")
    shadow_queue: int = Field(256, ge=1, description="most sentences a candidate in shadow may hold queued; more "
                              "copies are shed (so are all while the live queue is over half of max_queue_size)")
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

    # Priority classes (service/batcher.py): levels numbered as Triton numbers them, 1 the highest
    priority_levels: int = Field(3, ge=1, le=10, description="priority levels a request may ask for (1: priorities "
                                 "off)")
    default_priority: int = Field(2, ge=1, description="the level of a request that gives none (or 0, as in Triton)")
    priority_queue_shares: str = Field("", description="comma-separated, one per level, highest first: the share of "
                                       "max_queue_size the whole queue may reach and still admit that level (empty: "
                                       "level k of n gets (n - k + 1) / n)")
    priority_timeouts_s: str = Field("", description="comma-separated, one per level, highest first: its default "
                                     "deadline in seconds, at most request_timeout_s (empty: request_timeout_s)")
    priority_fair_every: int = Field(8, ge=0, description="starvation guard: one batch in every N starts from the "
                                     "oldest queued sentence of any level (0: never)")

    # Requests
    max_text_chars: int = Field(2000, ge=1, description="longest text in characters (longer: 422)")
    max_texts: int = Field(64, ge=1, description="most texts in one request (more: 422)")
    max_body_bytes: int = Field(1_048_576, ge=64, description="largest request body (larger: 413, refused before parsing)")
    default_top_k: int = Field(5, ge=1, description="classes listed per prediction when the request has no top_k")
    min_score: float | None = Field(None, ge=0, le=1, description="abstain when the top probability is below this, "
                                    "unless the request sets min_score or min_precision (unset: the model's own "
                                    "out-of-scope threshold if it was exported with one, else never)")

    # Response cache (service/cache.py)
    cache_max_bytes: int = Field(32 * 2**20, ge=0, description="each served model version's response cache holds "
                                 "at most this many bytes, per worker process (0: no cache)")

    # Input drift (service/drift.py)
    drift_window: int = Field(1000, ge=10, description="served sentences each model version's drift window holds")
    drift_alert_psi: float = Field(0.25, gt=0, description="a drift signal alerts above this population stability "
                                   "index")

    # Server
    workers: int = Field(0, ge=0, le=256, description="server processes sharing the port, each a whole service with "
                         "its own model thread (0: the CPUs this process may use: affinity and cgroup quota)")
    worker_crash_limit: int = Field(5, ge=1, description="with workers: this many worker deaths within "
                                    "worker_crash_window_s stop the service (exit 3); fewer are each replaced")
    worker_crash_window_s: float = Field(60.0, gt=0, description="the window worker_crash_limit counts deaths in")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC on this port, "
                           "Triton's default (0: gRPC off)")
    grpc_host: str = Field("", description="the address gRPC binds (empty: the same as host)")
    grpc_max_connection_age_s: float = Field(0.0, ge=0, description="close each gRPC connection gracefully (GOAWAY) "
                                             "after this long, so clients reconnect and spread again over workers "
                                             "and replicas (0: never)")
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

    # Tracing (service/tracing.py)
    otel_endpoint: str = Field("", description="OTLP/HTTP collector to send traces to, e.g. http://collector:4318 "
                               "(/v1/traces is added; empty: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                               "OTEL_EXPORTER_OTLP_ENDPOINT if set, else tracing off)")
    otel_sample_ratio: float = Field(1.0, ge=0, le=1, description="share of requests traced (a random draw each) "
                                     "when the request's traceparent does not decide")
    otel_queue_size: int = Field(2048, ge=1, description="most finished spans waiting for export; beyond it spans "
                                 "are dropped and counted (scs_trace_spans_total{outcome=\"dropped\"})")
    otel_export_timeout_s: float = Field(5.0, gt=0, description="longest one export to the collector may take")

    def traces_endpoint(self) -> str | None:
        """Where traces go (a full URL), or None: tracing off. SCS_OTEL_ENDPOINT first, then the OpenTelemetry
        variables (``OTEL_SDK_DISABLED=true`` turns those off); checked when the settings load."""
        if self.otel_endpoint:
            return _traces_url(self.otel_endpoint)
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        full = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if full:
            return full
        base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        return _traces_url(base) if base else None

    @field_validator("otel_endpoint")
    @classmethod
    def _otel_endpoint(cls, value: str) -> str:
        return _checked_url(value.strip(), "SCS_OTEL_ENDPOINT")

    def batch_limits(self, provider: str = "CPUExecutionProvider") -> BatchLimits:
        """The batching knobs for an engine on ``provider``: on CUDA, the knobs not set explicitly take
        ``CUDA_BATCH_DEFAULTS`` (a GPU runs a batch of hundreds in about the time of a batch of one)."""
        limits = {field.name: getattr(self, field.name) for field in fields(BatchLimits)
                  if field.name in type(self).model_fields}
        limits |= {"priority_queue_shares": self.queue_shares(), "priority_timeouts_s": self.level_timeouts(),
                   "min_queue_bound": self.max_texts}
        if provider == "CUDAExecutionProvider":
            limits |= {k: v for k, v in CUDA_BATCH_DEFAULTS.items() if k not in self.model_fields_set}
        return BatchLimits(**limits)

    def queue_shares(self) -> tuple[float, ...]:
        """Each level's share of max_queue_size, highest level first."""
        if self.priority_queue_shares.strip():
            return _per_level(self.priority_queue_shares, "SCS_PRIORITY_QUEUE_SHARES", self.priority_levels)
        n = self.priority_levels
        return tuple((n - k + 1) / n for k in range(1, n + 1))

    def level_timeouts(self) -> tuple[float, ...]:
        """Each level's default deadline in seconds, highest level first."""
        if self.priority_timeouts_s.strip():
            return _per_level(self.priority_timeouts_s, "SCS_PRIORITY_TIMEOUTS_S", self.priority_levels)
        return (self.request_timeout_s,) * self.priority_levels

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        VersionPolicy.parse(value)
        return value

    @model_validator(mode="after")
    def _otel_environment(self) -> "Settings":
        """The OpenTelemetry variables this service reads are checked as its own settings are."""
        if self.otel_endpoint or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return self
        for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            _checked_url(os.environ.get(name, "").strip(), name)
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
        if self.traces_endpoint() and protocol != "http/protobuf":
            raise ValueError(f"OTLP protocol {protocol!r}: this service exports traces over http/protobuf only "
                             f"(point it at the collector's OTLP/HTTP port, usually 4318)")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_queue_size < self.max_texts:
            raise ValueError(f"max_queue_size ({self.max_queue_size}) must be >= max_texts ({self.max_texts})")
        if self.default_priority > self.priority_levels:
            raise ValueError(f"default_priority ({self.default_priority}) must be a level, 1 to priority_levels "
                             f"({self.priority_levels})")
        shares = self.queue_shares()
        if not all(0 < share <= 1 for share in shares) or list(shares) != sorted(shares, reverse=True):
            raise ValueError(f"priority_queue_shares {self.priority_queue_shares!r}: each share in (0, 1], a lower "
                             f"level's never above a higher one's")
        if not all(0 < timeout <= self.request_timeout_s for timeout in self.level_timeouts()):
            raise ValueError(f"priority_timeouts_s {self.priority_timeouts_s!r}: each in (0, request_timeout_s "
                             f"({self.request_timeout_s:g})]")
        return self
