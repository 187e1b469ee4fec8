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

With a rollout policy (``model.json``'s ``rollout``, or the load call's parameter) a new version becomes a
*candidate* instead (``service.rollout``): loaded and warmed up the same way, then in shadow and/or canary while the
versions it would replace keep serving; promoted with the same swap, or refused (and then treated as a version that
failed its checks: not tried again until its files change or the load call asks).
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
from .rollout import Rollout, Shadow
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
        self.candidates: dict[str, Shadow] = {}  # model -> its candidate version (in shadow or canary)
        self.evaluations: dict[tuple[str, str], Shadow] = {}  # the last rollout of each version, decided or not
        self.judging: set[asyncio.Task] = set()
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
        own = self.model_json(name)
        if "version_policy" in own:
            try:
                return VersionPolicy.parse(own["version_policy"])
            except (ValueError, TypeError) as error:
                raise ArtifactError(f"{self.models[name] / 'model.json'}: expected {{\"version_policy\": "
                                    f"\"latest:N | all | specific:1,2\"}} ({error})") from None
        return VersionPolicy.parse(settings.version_policy)

    def model_json(self, name: str) -> dict:
        """The model folder's own ``model.json`` ({} without one); ``ArtifactError`` when it is not a JSON object
        of the known keys."""
        own = self.models[name] / "model.json"
        if self.kind == "version" or not own.is_file():
            return {}
        try:
            found = json.loads(own.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ArtifactError(f"{own}: not valid JSON ({error})") from None
        if not isinstance(found, dict) or set(found) - {"version_policy", "rollout"}:
            raise ArtifactError(f"{own}: expected an object with \"version_policy\" and/or \"rollout\" (got "
                                f"{sorted(found) if isinstance(found, dict) else type(found).__name__})")
        return found

    def rollout_policy(self, name: str) -> Rollout | None:
        """The model's rollout policy (``model.json``), or None: new versions swap in at once."""
        own = self.model_json(name)
        if "rollout" not in own:
            return None
        try:
            return Rollout.parse(own["rollout"], f"{self.models[name] / 'model.json'}: rollout")
        except ValueError as error:
            raise ArtifactError(str(error)) from None

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

    def route(self, model: str | None = None, version: str | None = None, canary: bool = False) -> Engine:
        """The engine for a request: ``model`` (default: the default model) at ``version`` (default: its newest
        served; with ``canary``, an inference request, a candidate in its canary takes its share). Raises a 404
        ``ServiceError`` for an unknown model or a version not served."""
        name = model or self.default_model
        versions = self.engines.get(name)
        if not versions:
            raise not_found(f"model {name[:100]!r} is not served (served: {', '.join(sorted(self.engines)) or 'none'})")
        if version is None:
            live = versions[max(versions)]
            if canary and self.candidates:  # one dict lookup more, only while some model has a candidate
                candidate = self.candidates.get(name)
                if candidate is not None and candidate.stage == "canary":
                    return candidate.pick(live)  # the whole request, one version
            return live
        number = contract.parse_version(version)
        if number not in versions:
            candidate = self.candidates.get(name)
            if candidate is not None and number is not None and str(number) == candidate.version:
                if candidate.stage == "canary":
                    return candidate.candidate
                raise not_found(f"model {name!r} version {number} is a candidate in shadow: it answers no client "
                                "until it is promoted")
            raise not_found(f"model {name!r} has no version {version[:40]!r} served (served: "
                            f"{', '.join(map(str, sorted(versions)))})")
        return versions[number]

    @property
    def lock(self) -> asyncio.Lock:
        """Held by every change of the routing table that awaits (sync, a candidate's promotion)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def sync(self, only: str | None = None, retry_refused: bool = False, rollout: Rollout | None = None) -> dict:
        """Bring the routing table to what the repository and the policies say now: load, warm up and add new
        versions, then retire the ones no longer wanted. A refused version is tried again only once its files
        changed, or with ``retry_refused`` (the load API). With a rollout policy (``rollout``, else the model's
        own) the newest new version of a served model becomes its candidate instead, and nothing retires until it
        is decided. Returns what changed (for the load API and the log)."""
        async with self.lock:
            changes: dict = {"loaded": [], "retired": [], "refused": [], "candidates": []}
            if only:
                self.unloaded.discard(only)
            for name in [only] if only else [n for n in self.models if n not in self.unloaded]:
                try:
                    wanted = set(self.wanted(name))
                    policy = rollout or self.rollout_policy(name)
                except (ArtifactError, OSError) as error:
                    changes["refused"].append({"model": name, "reason": str(error)})
                    continue
                self._forget_deleted(name)
                current = self.engines.get(name, {})
                pending = self.candidates.get(name)
                if pending is not None:
                    if int(pending.version) in wanted:
                        continue  # under evaluation: this model changes when it is decided
                    self.end_candidate(name, "aborted", "no longer chosen by the version policy")
                new = sorted(wanted - set(current))
                if policy is not None and current and new:
                    engine = await self._open(name, new[-1], retry_refused, changes)
                    if engine is not None:
                        self._begin(name, engine, policy)
                        changes["candidates"].append({"model": name, "version": new[-1],
                                                      "stage": self.candidates[name].stage})
                    continue  # what serves keeps serving until the candidate is decided
                for version in new:
                    engine = await self._open(name, version, retry_refused, changes)
                    if engine is None:
                        continue
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

    async def _open(self, name: str, version: int, retry_refused: bool, changes: dict) -> Engine | None:
        """Check, load, start and warm up one version; None when it is refused (now, or before and unchanged)."""
        state = fingerprint(self.models[name] / str(version))
        refused = self.refused.get((name, version))
        if refused and not retry_refused and refused.fingerprint == state:
            return None  # unchanged since it was refused
        try:
            engine = await asyncio.get_running_loop().run_in_executor(self.loader, self.load, name, version)
            engine.start(self.on_failure)
            await engine.warm_up()
        except Exception as error:  # a broken artifact, or a warm-up that fails: refused either way
            self.refuse(name, version, error, state)
            changes["refused"].append({"model": name, "version": version, "reason": str(error)})
            return None
        self.refused.pop((name, version), None)
        return engine

    async def load_model(self, name: str, rollout: Rollout | None = None) -> dict:
        """The load API: (re)load ``name``'s versions as its policy chooses, refused ones included; with
        ``rollout`` (the call's parameter, over ``model.json``'s) a new version becomes a candidate. A 404
        ``ServiceError`` for a model the repository does not hold, a 400 when a wanted version does not load."""
        self._known(name)
        changes = await self.sync(name, retry_refused=True, rollout=rollout)
        pending = self.candidates.get(name)
        if pending is not None and not changes["candidates"]:
            changes["candidates"].append({"model": name, "version": int(pending.version), "stage": pending.stage})
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

    def _known(self, name: str) -> None:
        if name not in self.models:
            raise not_found(f"model {name[:100]!r} is not in the repository")

    async def unload(self, name: str) -> dict:
        """Stop serving every version of ``name`` (its queued work finishes first); a candidate is aborted."""
        self._known(name)
        self.unloaded.add(name)
        if name in self.candidates:
            self.end_candidate(name, "aborted", "the model was unloaded")
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
        self._release_later(engine)
        log.info("retiring model version", extra={"fields": {"model": name, "version": version}})

    def _release_later(self, engine: Engine) -> None:
        task = asyncio.get_running_loop().create_task(self._release(engine),
                                                      name=f"retire-{engine.name}-{engine.version}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    # --- candidates (service.rollout) -------------------------------------------------------------------------

    def _begin(self, name: str, engine: Engine, policy: Rollout) -> None:
        """A loaded, warm version becomes ``name``'s candidate against its newest served version."""
        versions = self.engines[name]
        live = versions[max(versions)]
        shadow = Shadow(live, engine, policy, self.settings.shadow_share, self.settings.shadow_queue, self.metrics)
        self.candidates[name] = self.evaluations[(name, engine.version)] = shadow
        if shadow.stage == "shadow":
            live.shadow = shadow.copy
        if policy.gate is not None:
            task = asyncio.get_running_loop().create_task(self._judge(name, shadow), name=f"gate-{name}")
            self.judging.add(task)
            task.add_done_callback(self.judging.discard)
        log.info("candidate model version", extra={"fields": {"model": name, "version": engine.version,
                                                              "stage": shadow.stage, "live_version": live.version,
                                                              "policy": policy.model_dump(exclude_none=True)}})

    async def _judge(self, name: str, shadow: Shadow) -> None:
        """The gate's verdict: promoted (or on to the canary), or refused with each failed criterion."""
        passed, why = await shadow.judged()
        async with self.lock:
            if self.candidates.get(name) is not shadow:
                return  # decided meanwhile (promoted or aborted through the API, unloaded)
            if not passed:
                self.end_candidate(name, "refused", f"shadow gate: {why}")
            elif shadow.policy.canary is not None:
                self._unhook(shadow)
                shadow.stage = "canary"
                self.metrics.rollout_decisions.labels(name, shadow.version, "canary").inc()
                log.info("shadow gate passed; canary", extra={"fields": {
                    "model": name, "version": shadow.version, "checks": why,
                    "weight": shadow.policy.canary.weight}})
            else:
                self._promote(name, f"shadow gate: {why}")

    def _unhook(self, shadow: Shadow) -> None:
        if shadow.live.shadow == shadow.copy:
            shadow.live.shadow = None

    def _promote(self, name: str, why: str) -> dict:
        """The candidate takes the traffic (today's swap: it enters the table, the versions the policy no longer
        wants leave it at once and are released once their queues drain)."""
        shadow = self.candidates.pop(name)
        self._unhook(shadow)
        shadow.end("promoted", why)
        version = int(shadow.version)
        self.engines.setdefault(name, {})[version] = shadow.candidate
        self.changed()
        self.metrics.rollout_decisions.labels(name, shadow.version, "promoted").inc()
        log.info("promoted candidate model version", extra={"fields": {
            "model": name, "version": version, "why": why, "compared": shadow.compared}})
        try:
            wanted = set(self.wanted(name)) | {version}
        except (ArtifactError, OSError):
            wanted = {version}
        retired = [{"model": name, "version": v} for v in sorted(set(self.engines[name]) - wanted)]
        for entry in retired:
            self.retire(name, entry["version"])
        return {"loaded": [{"model": name, "version": version}], "retired": retired, "refused": [], "candidates": []}

    def end_candidate(self, name: str, verdict: str, reason: str) -> dict:
        """Refused or aborted: the candidate is released after its queue drains, what served keeps serving, and the
        version is not tried again until its files change or the load API asks (as a version that failed its
        checks)."""
        shadow = self.candidates.pop(name)
        self._unhook(shadow)
        shadow.end(verdict, reason)
        version = int(shadow.version)
        self.refused[(name, version)] = Refused(f"{verdict}: {reason}", fingerprint(self.models[name] / str(version)))
        self._release_later(shadow.candidate)
        self.metrics.rollout_decisions.labels(name, shadow.version, verdict).inc()
        log.warning("candidate model version not promoted", extra={"fields": {
            "model": name, "version": version, "verdict": verdict, "reason": reason, "compared": shadow.compared}})
        return {"loaded": [], "retired": [{"model": name, "version": version, "reason": reason}],
                "refused": [], "candidates": []}

    async def promote(self, name: str) -> dict:
        """The repository API: promote ``name``'s candidate now, whatever its gate says so far."""
        self._known(name)
        async with self.lock:
            if name not in self.candidates:
                raise not_found(f"model {name!r} has no candidate version to promote")
            return self._promote(name, "promoted through the repository API")

    async def abort(self, name: str) -> dict:
        """The repository API: drop ``name``'s candidate; what serves keeps serving."""
        self._known(name)
        async with self.lock:
            if name not in self.candidates:
                raise not_found(f"model {name!r} has no candidate version to abort")
            return self.end_candidate(name, "aborted", "aborted through the repository API")

    def shadow_report(self, name: str, version: str) -> dict:
        """The last rollout of a version (under way or decided); 404 ``ServiceError`` when it never had one."""
        number = contract.parse_version(version)
        shadow = self.evaluations.get((name, str(number))) if number is not None else None
        if shadow is None:
            raise not_found(f"model {name[:100]!r} version {version[:40]!r} has not been a candidate (a rollout "
                            "policy makes a new version one)")
        return shadow.report()

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
        engines = self.all_engines() + [shadow.candidate for shadow in self.candidates.values()]
        for task in self.judging:
            task.cancel()
        self.candidates.clear()
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
                "candidate": ({"version": self.candidates[name].version, "stage": self.candidates[name].stage}
                              if name in self.candidates else None),
            })
        return out

