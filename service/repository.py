"""The model repository: which models and versions are served, and swapping versions while traffic flows.

Layout (Triton's): ``models/<name>/<version>/`` with integer versions; ``SCS_MODEL_DIR`` may also name one
model folder or one version folder. Each model's versions are chosen by a version policy (Triton's
vocabulary): ``latest:N`` (default ``latest:1``), ``all``, or ``specific:1,3``; ``SCS_VERSION_POLICY`` sets it for
every model, a model folder's own ``model.json`` (``{"version_policy": "all"}``) for that model.

Every served version has its own ``Engine`` (runtime and batch queue). ``route`` picks one for a request; it
runs on the event loop, and the request's sentences are queued before it next yields, so a version leaving the
routing table never refuses a request that was routed to it. A new version is checked (hashes, contract),
loaded and warmed up *before* it enters the table; the versions it replaces leave the table at once and are
released after their queues drain. A version that fails its checks is refused and logged with the file and the
reason, counted (``scs_model_load_failures_total``) and not tried again until its files change; what was
serving keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import contract
from contract import ArtifactError

from . import memory
from .engine import Engine
from .errors import ServiceError, not_found
from .metrics import Metrics
from .runtime import Runtime, load_runtime
from .settings import Settings, VersionPolicy

log = logging.getLogger("service.repository")


@dataclass
class Refused:
    """A version that failed its checks: why, and the state of its files then (it is retried when they change)."""

    reason: str
    fingerprint: tuple


def layout(root: Path) -> tuple[str, dict[str, Path]]:
    """What ``root`` is ("repository", "model" or "version") and its model folders by name."""
    if (root / contract.MANIFEST).is_file():
        if contract.parse_version(root.name) is None:
            raise ArtifactError(f"{root}: a version folder's name is its version, an integer (as in models/<name>/1)")
        return "version", {root.parent.resolve().name: root.parent}
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such model folder")
    if contract.versions(root):
        return "model", {root.name: root}
    models = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and contract.versions(p)}
    if not models:
        raise ArtifactError(f"{root}: no model folders (models/<name>/<version>/) and no version folders inside")
    return "repository", models


def fingerprint(folder: Path) -> tuple:
    """Sizes and modification times of the folder's files: whether a refused version has changed since."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
    except OSError:
        return ()


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics, tracing=None) -> None:
        self.settings, self.metrics, self.tracing = settings, metrics, tracing  # tracing: service.tracing.Tracing
        self.on_failure: Callable[[BaseException], None] | None = None  # a version's batcher task died
        self.kind, self.models = layout(settings.model_dir)
        if settings.models:
            wanted = [name.strip() for name in settings.models.split(",") if name.strip()]
            missing = [name for name in wanted if name not in self.models]
            if missing:
                raise ArtifactError(f"{settings.model_dir}: SCS_MODELS names {', '.join(missing)}, which the "
                                    f"repository does not hold (it has {', '.join(self.models)})")
            self.models = {name: self.models[name] for name in wanted}
        self.engines = {}  # the routing table (model -> version -> engine): what takes traffic
        self.refused: dict[tuple[str, int], Refused] = {}
        self.unloaded: set[str] = set()  # unloaded through the API: the poll leaves them alone until loaded again
        self.retiring: set[asyncio.Task] = set()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")  # one model thread for every engine
        # Versions are loaded and released on one thread of their own, one at a time, so each load's memory figure
        # (the heap it allocated) is never blurred by another load or release (README, "Memory").
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._stuck: dict[str, tuple] = {}  # model -> (wanted, serving) last warned about
        self._lock: asyncio.Lock | None = None

    # --- which versions --------------------------------------------------------------------------------------

    def policy(self, name: str) -> VersionPolicy:
        settings = self.settings
        if self.kind == "version":
            if settings.model_version is not None and settings.model_version != int(settings.model_dir.name):
                raise ArtifactError(f"{settings.model_dir} is version folder {settings.model_dir.name!r}, but version "
                                    f"{settings.model_version} was pinned")
            return VersionPolicy("specific", versions=(int(settings.model_dir.name),))
        if settings.model_version is not None:
            return VersionPolicy("specific", versions=(settings.model_version,))
        own = self.models[name] / "model.json"
        if own.is_file():
            try:
                return VersionPolicy.parse(json.loads(own.read_text(encoding="utf-8"))["version_policy"])
            except (ValueError, KeyError, TypeError) as error:
                raise ArtifactError(f"{own}: expected {{\"version_policy\": \"latest:N | all | specific:1,2\"}} "
                                    f"({error})") from None
        return VersionPolicy.parse(settings.version_policy)

    def wanted(self, name: str) -> list[int]:
        folder = self.models[name]
        if self.kind == "version":
            return [int(self.settings.model_dir.name)]
        if not folder.is_dir():
            return []
        # A version folder counts once its manifest is there: export writes it last, then renames the folder in.
        return self.policy(name).select([v for v in contract.versions(folder)
                                         if (folder / str(v) / contract.MANIFEST).is_file()])

    @property
    def default_model(self) -> str:
        """``SCS_DEFAULT_MODEL``, else the first served model by name."""
        return self.settings.default_model or self._first

    @property
    def engines(self) -> dict[str, dict[int, Engine]]:
        return self._engines

    @engines.setter
    def engines(self, table: dict[str, dict[int, Engine]]) -> None:
        self._engines = table
        self.changed()

    def changed(self) -> None:
        """The routing table changed: what a request without a model gets (computed here, not per request). With
        nothing served (every model unloaded) it stays the model last served, so a 404 names the right one."""
        if self._engines:
            self._first = min(self._engines)
        elif not hasattr(self, "_first"):
            self._first = min(self.models)

    # --- loading -----------------------------------------------------------------------------------------------

    def load(self, name: str, version: int, runtime: Runtime | None = None) -> Engine:
        """Check and open one version (blocking: call it from a thread once serving); ``ArtifactError`` if broken.
        ``runtime``: one already opened for this folder (tests hand in one with a fault injected)."""
        folder = self.models[name] / str(version)
        before = memory.heap_in_use()
        runtime = runtime or load_runtime(folder, self.settings.provider, self.settings.intra_op_threads,
                                          self.settings.inter_op_threads)
        if runtime.artifact.version != str(version):
            raise ArtifactError(f"{folder}/manifest.json: version {runtime.artifact.version!r}, but it lies in "
                                f"version folder {version}")
        engine = Engine(name, runtime, self.settings.batch_limits(runtime.provider), self.metrics, self.executor,
                        self.settings.drift_window, self.settings.drift_alert_psi, self.tracing,
                        self.settings.min_score, self.settings.cache_max_bytes)
        engine.memory_bytes = max(0, memory.heap_in_use() - before)
        engine.metrics.memory(engine.memory_bytes)
        return engine

    def refuse(self, name: str, version: int, error: Exception, state: tuple) -> None:
        """``state``: the folder's fingerprint taken *before* the check read it, so a copy that completes after the
        check (a non-atomic publish) counts as a change and is checked again at the next poll."""
        self.refused[(name, version)] = Refused(str(error), state)
        self.metrics.load_failures.labels(name, str(version)).inc()
        log.error("refused model version", extra={"fields": {"model": name, "version": version, "reason": str(error)}})

    def load_at_start(self, runtime: Runtime | None = None) -> None:
        """Before serving: load every wanted version. A failing version is refused and reported; the service
        refuses to start only when nothing loads, or when a model named in ``SCS_MODELS`` has no version."""
        for name in self.models:
            for version in self.wanted(name):
                folder = self.models[name] / str(version)
                given = runtime if runtime and runtime.artifact.folder.resolve() == folder.resolve() else None
                state = fingerprint(folder)
                try:
                    self.engines.setdefault(name, {})[version] = self.load(name, version, given)
                except ArtifactError as error:
                    if self.kind != "repository" or self.settings.models:
                        raise
                    self.refuse(name, version, error, state)
            if self.settings.models and not self.engines.get(name):
                raise ArtifactError(f"{self.models[name]}: SCS_MODELS names {name!r}, but none of its versions "
                                    f"{self.wanted(name) or '(none)'} loads")
        self.changed()
        if not any(self.engines.values()):
            reasons = "; ".join(r.reason for r in self.refused.values()) or "no version folder chosen by the policy"
            raise ArtifactError(f"{self.settings.model_dir}: no model could be loaded ({reasons})")
        if self.default_model not in self.engines:
            raise ArtifactError(f"SCS_DEFAULT_MODEL={self.default_model!r}: not served (served: "
                                f"{', '.join(self.engines)})")

    def served_versions(self, name: str) -> list[str]:
        """The versions of ``name`` taking traffic now, oldest first."""
        return [str(v) for v in sorted(self.engines.get(name, {}))]

    def all_engines(self) -> list[Engine]:
        return [engine for versions in self.engines.values() for engine in versions.values()]

    # --- serving ----------------------------------------------------------------------------------------------

    def route(self, model: str | None = None, version: str | None = None) -> Engine:
        """The engine for a request: ``model`` (default: the default model) at ``version`` (default: its newest
        served). Raises a 404 ``ServiceError`` for an unknown model or a version not served."""
        name = model or self.default_model
        versions = self.engines.get(name)
        if not versions:
            raise not_found(f"model {name[:100]!r} is not served (served: {', '.join(sorted(self.engines)) or 'none'})")
        if version is None:
            return versions[max(versions)]
        number = contract.parse_version(version)
        if number not in versions:
            raise not_found(f"model {name!r} has no version {version[:40]!r} served (served: "
                            f"{', '.join(map(str, sorted(versions)))})")
        return versions[number]

    async def sync(self, only: str | None = None, retry_refused: bool = False) -> dict:
        """Bring the routing table to what the repository and the policies say now: load, warm up and add new
        versions, then retire the ones no longer wanted. A refused version is tried again only once its files
        changed, or with ``retry_refused`` (the load API). Returns what changed (for the load API and the log)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            changes: dict = {"loaded": [], "retired": [], "refused": []}
            if only:
                self.unloaded.discard(only)
            for name in [only] if only else [n for n in self.models if n not in self.unloaded]:
                try:
                    wanted = set(self.wanted(name))
                except (ArtifactError, OSError) as error:
                    changes["refused"].append({"model": name, "reason": str(error)})
                    continue
                self._forget_deleted(name)
                current = self.engines.get(name, {})
                for version in sorted(wanted - set(current)):
                    state = fingerprint(self.models[name] / str(version))
                    refused = self.refused.get((name, version))
                    if refused and not retry_refused and refused.fingerprint == state:
                        continue  # unchanged since it was refused
                    try:
                        engine = await asyncio.get_running_loop().run_in_executor(self.loader, self.load, name,
                                                                                  version)
                        engine.start(self.on_failure)
                        await engine.warm_up()
                    except Exception as error:  # a broken artifact, or a warm-up that fails: refused either way
                        self.refuse(name, version, error, state)
                        changes["refused"].append({"model": name, "version": version, "reason": str(error)})
                        continue
                    self.refused.pop((name, version), None)
                    self.engines.setdefault(name, {})[version] = engine
                    self.changed()
                    changes["loaded"].append({"model": name, "version": version})
                    log.info("serving model version", extra={"fields": {"model": name, "version": version,
                                                                        "memory_bytes": engine.memory_bytes}})
                serving = self.engines.get(name, {})
                if not wanted & set(serving):
                    stuck = (tuple(sorted(wanted)), tuple(sorted(serving)))
                    if serving and self._stuck.get(name) != stuck:  # said once, not at every poll
                        log.warning("no wanted version of %s loads; still serving %s", name, sorted(serving))
                    self._stuck[name] = stuck
                    continue
                self._stuck.pop(name, None)
                for version in sorted(set(serving) - wanted):
                    self.retire(name, version)
                    changes["retired"].append({"model": name, "version": version})
            return changes

    async def load_model(self, name: str) -> dict:
        """The load API: (re)load ``name``'s versions as its policy chooses, refused ones included. A 404
        ``ServiceError`` for a model the repository does not hold, a 400 when a wanted version does not load."""
        if name not in self.models:
            raise not_found(f"model {name[:100]!r} is not in the repository")
        changes = await self.sync(name, retry_refused=True)
        serving = sorted(self.engines.get(name, {}))
        if changes["refused"] or not serving:
            reasons = "; ".join(r["reason"] for r in changes["refused"]) or "no version chosen by the policy"
            still = f"; still serving version(s) {', '.join(map(str, serving))}" if serving else ""
            raise ServiceError(400, "bad_request", f"model {name!r} failed to load: {reasons}{still}")
        return changes

    def _forget_deleted(self, name: str) -> None:
        """Refused versions whose folder is gone are no longer reported."""
        for key in [key for key in self.refused if key[0] == name]:
            if not (self.models[name] / str(key[1])).is_dir():
                del self.refused[key]

    async def unload(self, name: str) -> dict:
        """Stop serving every version of ``name`` (its queued work finishes first)."""
        if name not in self.models:
            raise not_found(f"model {name[:100]!r} is not in the repository")
        self.unloaded.add(name)
        retired = [{"model": name, "version": v} for v in sorted(self.engines.get(name, {}))]
        for version in list(self.engines.get(name, {})):
            self.retire(name, version)
        return {"loaded": [], "retired": retired, "refused": []}

    def retire(self, name: str, version: int) -> None:
        """Out of the routing table now; released once what it has queued is answered."""
        engine = self.engines[name].pop(version)
        if not self.engines[name]:
            del self.engines[name]
        self.changed()
        task = asyncio.get_running_loop().create_task(self._release(engine), name=f"retire-{name}-{version}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)
        log.info("retiring model version", extra={"fields": {"model": name, "version": version}})

    async def _release(self, engine: Engine) -> None:
        await engine.close(self.settings.request_timeout_s + 1)
        engine.metrics.remove()
        # On the loading thread: a load's memory figure is never taken while a release frees pages.
        await asyncio.get_running_loop().run_in_executor(self.loader, engine.release)

    async def poll(self, period: float) -> None:
        """``SCS_REPOSITORY_POLL_S``: look at the repository every ``period`` seconds."""
        while True:
            await asyncio.sleep(period)
            try:
                changes = await self.sync()
            except Exception:  # a poll must never take the service down
                log.exception("repository poll failed")
                continue
            if any(changes.values()):
                log.info("repository changed", extra={"fields": changes})

    async def close(self, timeout_s: float) -> bool:
        """Drain and release every engine within ``timeout_s``; False if some work was left."""
        engines = self.all_engines()
        self.engines = {}
        results = await asyncio.gather(*(engine.close(timeout_s) for engine in engines), *self.retiring,
                                       return_exceptions=True)
        self.executor.shutdown(wait=False)
        self.loader.shutdown(wait=False)
        return all(result is True or result is None for result in results)

    def describe(self) -> list[dict]:
        """Every model in the repository: its policy, the versions served and the ones refused (with why)."""
        out = []
        for name, folder in self.models.items():
            served = self.engines.get(name, {})
            try:
                policy = str(self.policy(name))
            except ArtifactError as error:
                policy = f"invalid: {error}"
            out.append({
                "name": name, "default": name == self.default_model, "policy": policy,
                "versions": [engine.describe() for _, engine in sorted(served.items())],
                "refused": [{"version": str(v), "reason": r.reason} for (n, v), r in sorted(self.refused.items())
                            if n == name],
            })
        return out

