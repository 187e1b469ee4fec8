"""``POST /classify``: parse, call the engine, write. A raw ASGI handler, because this is the hot path.

Measured per request, FastAPI's machinery (dependency solving, response validation, JSONResponse) cost more
than the model's share of a batch; so this route reads the body itself (the size limit applies before
parsing), validates it with the pydantic model that also documents it (``service.openapi``), and writes
orjson bytes.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from pydantic import ValidationError

from .asgi import ClientGone, cancel_if_client_leaves, read_body, respond
from .engine import Classification
from .errors import ServiceError, internal_error, new_error_id
from .logs import request_id
from .schemas import ClassifyRequest, Limits, invalid_request, top_k_out_of_range
from .state import ServiceState

log = logging.getLogger("service.classify")


class ClassifyRoute:
    def __init__(self, state: ServiceState) -> None:
        settings = state.settings
        self.state = state
        self.limits = Limits(settings.max_text_chars, settings.max_texts)
        self.max_body = settings.max_body_bytes
        self.default_top_k = settings.default_top_k
        self.default_min_score = settings.min_score

    async def __call__(self, scope, receive, send) -> None:
        headers = None
        try:
            body, status = await self._answer(scope, receive), 200
        except ServiceError as error:
            status, body, headers = error.status, error.body(), error.headers
        except (ClientGone, asyncio.CancelledError):
            self.state.metrics.reject("client_disconnected")
            return
        except Exception:
            error_id = new_error_id()
            log.exception("unhandled error in /classify", extra={"fields": {"error_id": error_id}})
            error = internal_error(error_id)
            status, body = error.status, error.body()
        await respond(send, status, body, headers=headers)

    async def _answer(self, scope, receive) -> bytes:
        self.state.serving()
        raw = await read_body(scope, receive, self.max_body)
        try:
            request = ClassifyRequest.model_validate_json(raw, context=self.limits)
        except ValidationError as error:
            raise invalid_request(raw, error.errors(include_url=False)) from None
        texts = [request.text] if request.texts is None else request.texts
        # From here to the queue nothing awaits: the version routed to cannot leave the table in between.
        engine = self.state.repository.route(request.model, request.version)
        classes = len(engine.labels)
        if request.top_k is not None and request.top_k > classes:
            raise top_k_out_of_range(classes)
        min_score = engine.min_score(request.min_score, request.min_precision, self.default_min_score)
        stop_watching = cancel_if_client_leaves(scope, receive)
        try:
            result = await engine.classify(texts, request_id.get())
        finally:
            stop_watching()
        answer, abstained = render(result, min(request.top_k or self.default_top_k, classes), min_score)
        engine.abstained(abstained)
        return orjson.dumps(answer)


def render(result: Classification, top_k: int, min_score: float | None = None) -> tuple[dict, int]:
    """The answer, and how many of its predictions abstained (score under ``min_score``)."""
    labels, predictions, abstentions = result.labels, [], 0
    for scores, truncated in zip(result.scores, result.truncated):
        probabilities, ranked = scores.probabilities, scores.ranked
        best = ranked[0]
        abstained = min_score is not None and probabilities[best] < min_score
        abstentions += abstained
        predictions.append({"label": None if abstained else labels[best], "score": probabilities[best],
                            "probabilities": {labels[i]: probabilities[i] for i in ranked[:top_k]},
                            "truncated": truncated, "abstained": abstained})
    return {"model": result.model, "version": result.version, "predictions": predictions}, abstentions
