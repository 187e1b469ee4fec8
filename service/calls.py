"""What every protocol's request becomes, and the one way it reaches an engine: ``infer`` routes a ``Call`` to its
model version and makes the one ``Engine.classify`` of the request. ``POST /classify``, V2 over REST
(``service.hot_route``) and V2 over gRPC each parse their wire format into a ``Call`` and render the ``Answer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .engine import Answer
from .errors import ServiceError
from .logs import request_id
from .repository import Repository


@dataclass(slots=True)
class Call:
    """What one request asks of the engine, parsed from its protocol's body; ``view`` is what the protocol's
    renderer needs of the request (``top_k``, the outputs asked for, the request's id)."""

    texts: list[str]
    model: str | None = None
    version: str | None = None
    min_score: float | None = None
    min_precision: float | None = None
    timeout_s: float | None = None
    view: object = None
    priority: int | None = None  # the queue's level, 1 the highest (None: the default level)
    cached: bool = True  # False: bypass the response cache


class WireProtocol(Protocol):
    """A wire format: its requests in, its answers and errors out (``Reply``: whatever its transport writes)."""

    def parse(self, scope, body: bytes) -> Call: ...

    def check(self, call: Call, labels: list[str]) -> None: ...  # what depends on the model (top_k and the like)

    def render(self, call: Call, answer: Answer): ...

    def error(self, error: ServiceError): ...


Reply = tuple[int, bytes, bytes, dict[str, str] | None]  # an HTTP answer: status, body, content type, extra headers




async def infer(repository: Repository, protocol: WireProtocol, call: Call) -> Answer:
    """The request's one engine call, on the version it names (404 ``ServiceError`` if none is served)."""
    # From routing to the queue nothing awaits: the version routed to cannot leave the table in between.
    engine = repository.route(call.model, call.version, canary=True)
    protocol.check(call, engine.labels)
    return await engine.classify(call.texts, call.min_score, call.min_precision, call.timeout_s, request_id.get(),
                                 call.priority, call.cached)
