"""A candidate version proves itself before it serves: shadow evaluation, the promotion gate and the canary split.

A model's ``rollout`` policy (its ``model.json``, or the ``rollout`` parameter of the V2 load call) makes a new
version a *candidate* instead of swapping it in: it is checked, loaded and warmed up as usual, then

- **shadow**: it answers no client. After a live request's answer is ready, the request is copied whole to the
  candidate with probability ``share``; each copied sentence is compared with the live answer (argmax agreement,
  absolute probability shift, abstention of each side, model time). Shadow work never sits in front of live work:
  the copy is queued only once the live answer exists (on the next turn of the event loop, after it was written),
  it goes to the candidate's own batch queue, so at most one shadow batch waits on the shared model thread, and
  **a copy is dropped (counted as shed) when the candidate already holds ``SCS_SHADOW_QUEUE`` sentences or the live
  version's queue is over half of ``SCS_MAX_QUEUE_SIZE``**: under load the shadow is what goes first. With the
  response cache on, a copy whose sentences the candidate already answered is compared from the candidate's cache
  (answers are batch-invariant), so repeated traffic costs the shadow no model run; the others are run and kept.
- **gate**: once ``min_sentences`` are compared, the criteria are checked (``min_agreement``,
  ``max_abstention_increase``, optionally ``max_latency_ratio``); all hold: promoted (or on to the canary), else
  refused, and the log line and the shadow route name each failed criterion and by how much. ``timeout_s`` without
  enough sentences refuses it too.
- **canary**: a share ``weight`` of the requests that name no version is answered by the candidate, whole (one
  version per request), counted per version, until promoted or aborted through the repository API.

The repository (``service.repository``) owns the lifecycle (load, promote with the usual swap, refuse, abort);
this module owns the policy, the comparison and the gate's verdict.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ServiceError

if TYPE_CHECKING:
    from .batcher import Job
    from .engine import Engine
    from .metrics import Metrics
    from .runtime import Scores

RESERVOIR = 10_000  # probability shifts kept for the p99 (a uniform sample once more were compared)


# --- the policy -------------------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ShadowPolicy(_Strict):
    share: float | None = Field(None, gt=0, le=1, description="share of live requests copied to the candidate "
                                "(default: SCS_SHADOW_SHARE)")


class GatePolicy(_Strict):
    min_sentences: int = Field(ge=1, le=10_000_000, description="sentences compared before the gate decides")
    min_agreement: float = Field(ge=0, le=1, description="share of sentences whose most likely class is the same")
    max_abstention_increase: float = Field(ge=0, le=1, description="candidate's abstention rate minus the live one's")
    max_latency_ratio: float | None = Field(None, gt=0, description="candidate's model time over the live "
                                            "version's for as many padded tokens, in batches of like size")
    timeout_s: float = Field(600.0, gt=0, le=7 * 86400, description="refused when not decided by then")


class CanaryPolicy(_Strict):
    weight: float = Field(gt=0, lt=1, description="share of requests (without a version) the candidate answers")


class Rollout(_Strict):
    """``{"shadow": {...}, "gate": {...}, "canary": {...}}``: shadow first, canary second, or either alone."""

    shadow: ShadowPolicy | None = None
    gate: GatePolicy | None = None
    canary: CanaryPolicy | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Rollout:
        if self.gate is not None and self.shadow is None:
            raise ValueError("a gate judges a shadow: add \"shadow\": {} (or drop the gate)")
        if self.shadow is None and self.canary is None:
            raise ValueError("a rollout needs a shadow, a canary or both")
        return self

    @classmethod
    def parse(cls, value: object, where: str) -> Rollout:
        """A rollout from ``model.json``'s ``rollout`` or the load call's parameter (an object, or one as a JSON
        string, as Triton passes its ``config`` parameter); ``ValueError`` naming each problem and where."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
        try:
            return cls.model_validate(value)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rollout'}: {e['msg'].removeprefix('Value error, ')}"
                                 for e in error.errors(include_url=False))
            raise ValueError(f"{where}: {problems}") from None


def load_parameters(parameters: object) -> Rollout | None:
    """The V2 load call's ``parameters`` (REST: the body's object; gRPC: the map's values): ``rollout`` or none.
    A 400 ``ServiceError`` naming the problem for anything else."""
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise ServiceError(400, "bad_request", "parameters must be an object, e.g. {\"rollout\": {...}}")
    unknown = sorted(set(parameters) - {"rollout"})
    if unknown:
        raise ServiceError(400, "bad_request", f"unknown load parameter(s) {', '.join(map(repr, unknown))[:200]}: "
                           "this server reads \"rollout\" only")
    if "rollout" not in parameters:
        return None
    try:
        return Rollout.parse(parameters["rollout"], "parameters.rollout")
    except ValueError as error:
        raise ServiceError(400, "bad_request", str(error)[:2000]) from None


def load_body(body: bytes) -> Rollout | None:
    """The REST load call's body: empty, or ``{"parameters": {"rollout": {...}}}``."""
    if not body.strip():
        return None
    try:
        request = json.loads(body)
    except ValueError as error:
        raise ServiceError(400, "bad_request", f"the load request body is not valid JSON ({error})") from None
    if not isinstance(request, dict) or set(request) - {"parameters"}:
        raise ServiceError(400, "bad_request", "the load request body must be {\"parameters\": {\"rollout\": "
                           "{...}}} (or empty)")
    return load_parameters(request.get("parameters"))


# --- the shadow's comparison ------------------------------------------------------------------------------------------

@dataclass
class Check:
    """One gate criterion against what was measured."""

    criterion: str
    bar: float
    measured: float | None
    passed: bool

    def describe(self) -> str:
        if self.measured is None:
            return f"{self.criterion}: not measured"
        sign = ">=" if self.criterion.startswith("min_") else "<="
        if self.passed:
            return f"{self.criterion}: {self.measured:.4g} {sign} {self.bar:g}"
        gap = abs(self.measured - self.bar)
        return f"{self.criterion}: {self.measured:.4g}, bar {sign} {self.bar:g} ({'short' if sign == '>=' else 'over'} " \
               f"by {gap:.4g})"

    def as_dict(self) -> dict:
        return {"criterion": self.criterion, "bar": self.bar, "measured": self.measured, "passed": self.passed,
                "by": None if self.measured is None else abs(self.measured - self.bar)}


class Shadow:
    """One candidate under evaluation against the live version: the copies, their comparison, the gate."""

    def __init__(self, live: Engine, candidate: Engine, policy: Rollout, share: float, queue_bound: int,
                 metrics: Metrics | None) -> None:
        self.live, self.candidate, self.policy = live, candidate, policy
        self.model, self.version, self.live_version = candidate.name, candidate.version, live.version
        self.share = policy.shadow.share if policy.shadow and policy.shadow.share is not None else share
        self.queue_bound = queue_bound
        self.live_shed_at = live.batcher.limits.max_queue_size // 2
        self.stage = "shadow" if policy.shadow is not None else "canary"
        self.started = time.monotonic()
        self.ended: float | None = None
        self.verdict: str | None = None  # promoted, refused, aborted
        self.reason = ""
        self.compared = self.shed = self.agreed = self.live_abstained = self.candidate_abstained = 0
        self.shift_total = 0.0
        self.shifts: list[float] = []
        self.canary_requests = {self.live_version: 0, self.version: 0}
        self.enough = asyncio.Event()
        self._counted = self._metrics(metrics) if metrics is not None else None

    # the hook on the live engine (Engine.shadow): cheap, on the event loop, once per answered request
    def copy(self, texts: list[str], scores: list[Scores], abstained: list[bool] | None,
             min_score: float | None, min_precision: float | None) -> None:
        if self.stage == "shadow" and random.random() < self.share:
            asyncio.get_running_loop().call_soon(self._submit, texts, scores, abstained, min_score, min_precision)

    def _submit(self, texts: list[str], scores: list[Scores], abstained: list[bool] | None,
                min_score: float | None, min_precision: float | None) -> None:
        """After the live answer: queue the copy on the candidate, or shed it (the rule in the module's doc)."""
        if self.stage != "shadow":
            return
        if (self.candidate.queue_depth + len(texts) > self.queue_bound
                or self.live.queue_depth > self.live_shed_at):
            self._count_shed(len(texts))
            return
        try:
            threshold = self.candidate.threshold(min_score, min_precision)
        except ServiceError:  # the candidate has no threshold for that precision: its abstentions are not compared
            threshold = None
        cache = self.candidate.cache
        if cache is not None:  # sentences the candidate already answered: compared again at no model cost
            entries = [cache.get(cache.key(text)) for text in texts]
            if None not in entries:
                self._compare_scores([cache.scores(entry) for entry in entries], scores, abstained, threshold)
                return
        try:
            job = self.candidate.batcher.submit(texts)
        except ServiceError:  # closing, or full after all
            self._count_shed(len(texts))
            return
        job.future.add_done_callback(lambda done: self._compare(done, job, texts, scores, abstained, threshold))

    def _count_shed(self, count: int) -> None:
        self.shed += count
        if self._counted is not None:
            self._counted[1](count)

    def _compare(self, done: asyncio.Future, job: Job, texts: list[str], live: list[Scores],
                 live_abstained: list[bool] | None, threshold: float | None) -> None:
        if done.cancelled() or done.exception() is not None:  # expired or failed: shed, never an error to anyone
            self._count_shed(len(live))
            return
        results, cache = done.result(), self.candidate.cache
        if cache is not None:  # with its response cache on, a batch's results are (Scores, entry): kept for next time
            for text, (_, entry), cut in zip(texts, results, job.truncated):
                cache.put(cache.key(text), entry, cut)
            results = [scores for scores, _ in results]
        self._compare_scores(results, live, live_abstained, threshold)

    def _compare_scores(self, results: list[Scores], live: list[Scores], live_abstained: list[bool] | None,
                        threshold: float | None) -> None:
        if self.stage != "shadow":
            return
        shifts = self.shifts
        for index, (mine, theirs) in enumerate(zip(results, live)):
            top = mine.ranked[0]
            self.agreed += top == theirs.ranked[0]
            shift = max(abs(a - b) for a, b in zip(mine.probabilities, theirs.probabilities))
            self.shift_total += shift
            self.compared += 1
            if len(shifts) < RESERVOIR:
                shifts.append(shift)
            else:
                slot = random.randrange(self.compared)
                if slot < RESERVOIR:
                    shifts[slot] = shift
            if live_abstained is not None and live_abstained[index]:
                self.live_abstained += 1
            if threshold is not None and mine.probabilities[top] < threshold:
                self.candidate_abstained += 1
        if self._counted is not None:
            self._counted[0](len(live))
        gate = self.policy.gate
        if gate is not None and self.compared >= gate.min_sentences:
            self.enough.set()

    # --- what it measured --------------------------------------------------------------------------------------

    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def shift(self, which: str) -> float | None:
        if not self.compared:
            return None
        if which == "mean":
            return self.shift_total / self.compared
        ordered = sorted(self.shifts)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def abstention(self, side: str) -> float | None:
        if not self.compared:
            return None
        return (self.live_abstained if side == "live" else self.candidate_abstained) / self.compared

    def latency_ratio(self) -> float | None:
        """Candidate's model time over what the live version took for as many padded tokens in batches of like size
        (as of the decision, once decided: a promoted candidate's time goes on counting live batches)."""
        if self.ended is not None:
            return self._final_ratio
        mine, theirs = self.candidate.model_time, self.live.model_time
        spent = expected = 0.0
        for bucket, (seconds, tokens) in enumerate(zip(mine.seconds, mine.tokens)):
            if tokens and theirs.tokens[bucket]:
                spent += seconds
                expected += tokens * theirs.seconds[bucket] / theirs.tokens[bucket]
        return spent / expected if expected > 0 else None

    def candidate_ms(self) -> float | None:
        """The candidate's mean model time per sentence, in milliseconds."""
        if self.ended is not None:
            return self._final_ms
        mine = self.candidate.model_time
        sentences = sum(mine.sentences)
        return 1000 * sum(mine.seconds) / sentences if sentences else None

    def checks(self) -> list[Check]:
        gate = self.policy.gate
        if gate is None:
            return []
        live, candidate = self.abstention("live"), self.abstention("candidate")
        increase = None if live is None else candidate - live
        agreement = self.agreement()
        checks = [Check("min_sentences", gate.min_sentences, self.compared, self.compared >= gate.min_sentences),
                  Check("min_agreement", gate.min_agreement, agreement,
                        agreement is not None and agreement >= gate.min_agreement),
                  Check("max_abstention_increase", gate.max_abstention_increase, increase,
                        increase is not None and increase <= gate.max_abstention_increase + 1e-12)]
        if gate.max_latency_ratio is not None:
            ratio = self.latency_ratio()
            checks.append(Check("max_latency_ratio", gate.max_latency_ratio, ratio,
                                ratio is not None and ratio <= gate.max_latency_ratio))
        return checks

    async def judged(self) -> tuple[bool, str]:
        """Wait for the gate: (passed, why). Enough sentences: every criterion decides; else the timeout refuses."""
        gate = self.policy.gate
        assert gate is not None
        try:
            await asyncio.wait_for(self.enough.wait(), max(0.0, gate.timeout_s - (time.monotonic() - self.started)))
        except TimeoutError:
            return False, (f"timed out after {gate.timeout_s:g} s with {self.compared} of the {gate.min_sentences} "
                           f"sentences compared ({self.shed} shed)")
        checks = self.checks()
        failed = [check for check in checks if not check.passed]
        if failed:
            return False, "; ".join(check.describe() for check in failed)
        return True, "; ".join(check.describe() for check in checks)

    def end(self, verdict: str, reason: str) -> None:
        """Decided: no more copies; the engines are the repository's again (this record only reports)."""
        self._final_ratio, self._final_ms = self.latency_ratio(), self.candidate_ms()
        self.stage, self.verdict, self.reason, self.ended = verdict, verdict, reason, time.monotonic()
        self.enough.set()

    # --- the canary ----------------------------------------------------------------------------------------------

    def pick(self, live: Engine) -> Engine:
        """A request without a version during the canary: the candidate with probability ``weight``, whole."""
        if random.random() < self.policy.canary.weight:
            engine = self.candidate
        else:
            engine = live
        self.canary_requests[engine.version] = self.canary_requests.get(engine.version, 0) + 1
        if self._counted is not None:
            self._counted[2](engine.version)
        return engine

    # --- reports ---------------------------------------------------------------------------------------------------

    def report(self) -> dict:
        """``GET /v1/models/{name}/versions/{version}/shadow``."""
        gate = self.policy.gate
        live, candidate = self.abstention("live"), self.abstention("candidate")
        checks = self.checks()
        return {
            "model": self.model, "version": self.version, "live_version": self.live_version, "stage": self.stage,
            "verdict": self.verdict, "reason": self.reason or None,
            "seconds": round((self.ended or time.monotonic()) - self.started, 3),
            "policy": self.policy.model_dump(exclude_none=True), "share": self.share,
            "sentences": {"compared": self.compared, "shed": self.shed},
            "agreement": self.agreement(),
            "probability_shift": {"mean": self.shift("mean"), "p99": self.shift("p99")},
            "abstention_rate": {"live": live, "candidate": candidate,
                                "increase": None if live is None else candidate - live},
            "model_time": {"candidate_ms_per_sentence": self.candidate_ms(), "latency_ratio": self.latency_ratio()},
            "gate": None if gate is None else {
                "checks": [check.as_dict() for check in checks],
                "failed": [check.describe() for check in checks if not check.passed]},
            "canary": None if self.policy.canary is None else {
                "weight": self.policy.canary.weight, "requests": dict(self.canary_requests)},
        }

    def _metrics(self, metrics: Metrics) -> tuple[Callable[[int], None], Callable[[int], None], Callable[[str], None]]:
        """Bind the gauges to this evaluation (read at scrape time); the counters' incrementers."""
        labels = (self.model, self.version)
        metrics.bind(metrics.shadow_agreement.labels(*labels), lambda: self.agreement() or 0.0)
        for stat in ("mean", "p99"):
            metrics.bind(metrics.shadow_shift.labels(*labels, stat), lambda stat=stat: self.shift(stat) or 0.0)
        for side in ("live", "candidate"):
            metrics.bind(metrics.shadow_abstention.labels(*labels, side), lambda side=side: self.abstention(side) or 0.0)
        metrics.bind(metrics.shadow_latency_ratio.labels(*labels), lambda: self.latency_ratio() or 0.0)
        compared = metrics.shadow_sentences.labels(*labels, "compared").inc
        shed = metrics.shadow_sentences.labels(*labels, "shed").inc
        children: dict[str, Callable[[], None]] = {}

        def canary(version: str) -> None:
            if version not in children:
                children[version] = metrics.canary_requests.labels(self.model, version).inc
            children[version]()

        return compared, shed, canary
