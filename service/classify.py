"""``POST /classify``: its wire format on the hot route's one path (``service.hot_route``). The request is validated by
the pydantic model that also documents it (``service.schemas``); the answer is written with orjson."""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from .calls import Call, Reply
from .engine import Answer
from .errors import ServiceError
from .hot_route import JSON, no_cache
from .schemas import ClassifyRequest, Limits, invalid_request, top_k_out_of_range
from .settings import Settings


class ClassifyProtocol:
    def __init__(self, settings: Settings) -> None:
        self.request = ClassifyRequest.within(Limits(settings.max_text_chars, settings.max_texts,
                                                     settings.priority_levels))
        self.default_top_k = settings.default_top_k

    def parse(self, scope, body: bytes) -> Call:
        try:
            request = self.request.model_validate_json(body)
        except ValidationError as error:
            raise invalid_request(body, error.errors(include_url=False)) from None
        texts = [request.text] if request.texts is None else request.texts
        return Call(texts, request.model, request.version, request.min_score, request.min_precision,
                    view=request.top_k, priority=request.priority or None,
                    cached=request.cache and not no_cache(scope))

    def check(self, call: Call, labels: list[str]) -> None:
        if call.view is not None and call.view > len(labels):
            raise top_k_out_of_range(len(labels))

    def render(self, call: Call, answer: Answer) -> Reply:
        labels = answer.labels
        top_k = min(call.view or self.default_top_k, len(labels))
        abstained = answer.abstained or [False] * len(answer.scores)
        predictions = []
        for index, (scores, truncated, no) in enumerate(zip(answer.scores, answer.truncated, abstained)):
            probabilities, ranked = scores.probabilities, scores.ranked
            best = ranked[0]
            prediction = {"label": None if no else labels[best], "score": probabilities[best],
                          "probabilities": {labels[i]: probabilities[i] for i in ranked[:top_k]},
                          "truncated": truncated, "abstained": no}
            if answer.multi_label:
                prediction["labels"] = [labels[i] for i in answer.chosen(index)]
            predictions.append(prediction)
        body = {"model": answer.model, "version": answer.version, "predictions": predictions}
        if answer.multi_label:
            body["multi_label"] = True
        return 200, orjson.dumps(body), JSON, None

    def error(self, error: ServiceError) -> Reply:
        return error.status, error.body(), JSON, error.headers
