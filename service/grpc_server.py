"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``) and the standard health service
(``grpc.health.v1.Health``), served by grpcio's asyncio server on the service's own event loop, beside uvicorn:
the same engines, queues, repository and lifecycle as HTTP.

Every method is one handler around the same steps as an HTTP request: request id (``x-request-id`` metadata, else
made), auth (``authorization: Bearer <key>`` metadata when ``SCS_API_KEY`` is set; the health methods, ServerLive and
ServerReady stay open, as the HTTP probes do), an optional trace span, the method, then its metrics
(``scs_requests_total{protocol="grpc"}``, the code's name as ``status``) and access log line. ``ModelInfer`` is the
hot one: ``GrpcV2Protocol.parse`` -> ``service.calls.infer`` (the request's one engine call) -> ``render``. Errors
are ``ServiceError``s turned into statuses by one table (``service.grpc_v2.CODES``). Requests reach the handlers as
bytes and are parsed there, so malformed protobuf is INVALID_ARGUMENT rather than grpcio's INTERNAL.

A cancelled call (the client cancelled, or its deadline passed) cancels its handler's task, which drops its sentences
still queued; the call's deadline is its request's deadline. Messages over ``SCS_MAX_BODY_BYTES`` are refused by
gRPC itself (RESOURCE_EXHAUSTED). Lifecycle: ``start`` binds the port (each worker its own socket in a SO_REUSEPORT
group: grpcio's Python API cannot adopt a socket the supervisor holds); ``stop`` takes no new calls at once and
gives the calls in flight what is left of the shutdown deadline (``service.server.Server.shutdown``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from . import logs
from .calls import infer
from .errors import ServiceError, internal_error, new_error_id, unauthorized
from .grpc_messages import (HEALTH, SERVICE, HealthCheckRequest, HealthCheckResponse,
                            ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
                            RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest,
                            RepositoryModelLoadResponse, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse,
                            ServerLiveResponse, ServerMetadataResponse, ServerReadyResponse)
from .grpc_v2 import GrpcV2Protocol, parsed, status_of
from .lifecycle import Phase, ServiceState
from .rollout import load_parameters
from .routes import change_repository, model_metadata_of, repository_index
from .v2 import SERVER_METADATA

log = logging.getLogger("service.grpc")
OPEN = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady", f"/{HEALTH}/Check", f"/{HEALTH}/Watch"})
SERVING, NOT_SERVING = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING
WATCH_EVERY_S = 0.5  # how often Watch looks at the service's phase


class BindError(Exception):
    """The gRPC port could not be had."""


class GrpcServer:
    def __init__(self, state: ServiceState, address: str, group: bool) -> None:
        """``group``: bind the port in a SO_REUSEPORT group (one worker of several); else a port another process
        holds is refused."""
        settings = state.settings
        self.state, self.address, self.group = state, address, group
        self.protocol = GrpcV2Protocol(settings)
        self.expected = (f"Bearer {settings.api_key.get_secret_value()}".encode()
                         if settings.api_key is not None else None)
        self.access_log = logging.getLogger("service.access") if settings.access_log else None
        self.in_flight = 0
        state.metrics.bind(state.metrics.in_flight.labels("grpc"), lambda: self.in_flight)
        self.server: grpc.aio.Server | None = None
        self._stopped: asyncio.Future | None = None
        self._ids = 0
        self._prefix = f"g{id(self) & 0xFFFFFF:06x}"
        self.port = 0

    async def start(self) -> None:
        """Bind and serve (``BindError`` if the port cannot be had)."""
        server = grpc.aio.server(options=server_options(self.state.settings, self.group))
        inference = {
            "ServerLive": self._unary("ServerLive", self.server_live),
            "ServerReady": self._unary("ServerReady", self.server_ready),
            "ModelReady": self._unary("ModelReady", self.model_ready),
            "ServerMetadata": self._unary("ServerMetadata", self.server_metadata),
            "ModelMetadata": self._unary("ModelMetadata", self.model_metadata),
            "ModelInfer": self._unary("ModelInfer", self.model_infer),
            "RepositoryIndex": self._unary("RepositoryIndex", self.repository_index),
            "RepositoryModelLoad": self._unary("RepositoryModelLoad", self.repository_load),
            "RepositoryModelUnload": self._unary("RepositoryModelUnload", self.repository_unload),
        }
        health = {"Check": self._unary("Check", self.health_check, HEALTH),
                  "Watch": grpc.unary_stream_rpc_method_handler(self.health_watch)}
        for service, handlers in ((SERVICE, inference), (HEALTH, health)):
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as error:
            raise BindError(str(error)) from None
        if not self.port:
            raise BindError(f"cannot bind {self.address}")
        await server.start()
        self.server = server
        log.info("grpc serving", extra={"fields": {"address": self.address, "port": self.port}})

    def stop(self, grace_s: float) -> Awaitable[None]:
        """Take no new call from now on; the calls in flight get ``grace_s`` seconds, then are cancelled. Idempotent:
        every caller awaits the same stop."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self.server.stop(grace_s) if self.server is not None
                                                  else asyncio.sleep(0))
        return self._stopped

    # --- the one wrapper every unary method runs in ---------------------------------------------------------------

    def _unary(self, method: str, handle: Callable, service: str = SERVICE) -> grpc.RpcMethodHandler:
        endpoint = f"/{service}/{method}"
        open_ = endpoint in OPEN
        metrics, tracing, protocol = self.state.metrics, self.state.tracing, "grpc"

        async def serve(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            rid = None
            for key, value in metadata:
                if key == "x-request-id":
                    if 0 < len(value) <= 128 and value.isascii() and value.isprintable():
                        rid = value
                    break
            if rid is None:
                self._ids += 1
                rid = f"{self._prefix}-{self._ids:x}"
            token = logs.request_id.set(rid)
            span = span_token = None
            if tracing is not None and service == SERVICE and method not in ("ServerLive", "ServerReady"):
                span = tracing.start_rpc(service, method, metadata)
                if span is not None:
                    span.set_attribute("scs.request_id", rid)
                    span_token = logs.request_span.set(span)
            code = grpc.StatusCode.OK
            self.in_flight += 1
            try:
                if self.expected is not None and not open_ and not self._authorized(metadata):
                    raise unauthorized()
                response = await handle(body, context)
                context.set_trailing_metadata((("x-request-id", rid),))
                return response.SerializeToString()
            except ServiceError as error:
                code, message = status_of(error)
                await context.abort(code, message, (("x-request-id", rid),) + (
                    (("retry-after", error.headers["Retry-After"]),) if "Retry-After" in error.headers else ()))
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed: nobody to answer
                code = grpc.StatusCode.CANCELLED
                metrics.reject("client_disconnected")
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                error_id = new_error_id()
                log.exception("unhandled error", extra={"fields": {"method": endpoint, "error_id": error_id}})
                code, message = status_of(internal_error(error_id))
                await context.abort(code, f"{message} (error_id {error_id})")
            finally:
                self.in_flight -= 1
                seconds = time.perf_counter() - started
                trace_id = None
                if span is not None:
                    tracing.end_rpc(span, code.value[0], code in SERVER_FAILURES)
                    logs.request_span.reset(span_token)
                    trace_id = format(span.get_span_context().trace_id, "032x")
                metrics.observe_request(endpoint, code.name, seconds, trace_id, protocol)
                if self.access_log is not None:
                    self.access_log.info("grpc %s %s", endpoint, code.name, extra={"fields": {
                        "protocol": protocol, "method": endpoint, "status": code.name,
                        "duration_ms": round(seconds * 1000, 3)}})
                logs.request_id.reset(token)

        return grpc.unary_unary_rpc_method_handler(serve)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self.expected)
        return False

    # --- inference.GRPCInferenceService ---------------------------------------------------------------------------

    async def model_infer(self, body: bytes, context):
        self.state.serving()
        protocol = self.protocol
        call = protocol.parse(context, body)
        answer = await infer(self.state.repository, protocol, call)
        return protocol.render(call, answer)

    async def server_live(self, body: bytes, context):
        return ServerLiveResponse(live=self.state.phase is not Phase.FAILED)

    async def server_ready(self, body: bytes, context):
        return ServerReadyResponse(ready=self.state.ready)

    async def model_ready(self, body: bytes, context):
        request = parsed(ModelReadyRequest, body)
        self.state.repository.route(request.name, request.version or None)  # NOT_FOUND when not served
        return ModelReadyResponse(ready=self.state.ready)

    async def server_metadata(self, body: bytes, context):
        return ServerMetadataResponse(**SERVER_METADATA)

    async def model_metadata(self, body: bytes, context):
        request = parsed(ModelMetadataRequest, body)
        found = model_metadata_of(self.state.repository, request.name, request.version or None)
        response = ModelMetadataResponse(name=found["name"], versions=found["versions"], platform=found["platform"])
        for tensor in found["inputs"]:
            response.inputs.add(**tensor)
        for tensor in found["outputs"]:
            response.outputs.add(**tensor)
        return response

    async def repository_index(self, body: bytes, context):
        request = parsed(RepositoryIndexRequest, body)
        response = RepositoryIndexResponse()
        for row in repository_index(self.state.repository):
            if not request.ready or row["state"] == "READY":
                response.models.add(**row)
        return response

    async def repository_load(self, body: bytes, context):
        request = parsed(RepositoryModelLoadRequest, body)
        repository = self.state.repository
        parameters = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
                      for key, value in request.parameters.items()} if request.parameters else None
        await change_repository(self.state, lambda: repository.load_model(request.model_name,
                                                                          load_parameters(parameters)))
        return RepositoryModelLoadResponse()

    async def repository_unload(self, body: bytes, context):
        request = parsed(RepositoryModelUnloadRequest, body)
        repository = self.state.repository
        await change_repository(self.state, lambda: repository.unload(request.model_name))
        return RepositoryModelUnloadResponse()

    # --- grpc.health.v1.Health ------------------------------------------------------------------------------------

    def health(self, service: str) -> int | None:
        """The status of ``service`` ("" or the inference service: SERVING once ready, NOT_SERVING while warming up,
        draining or failed), None for a service this server does not have."""
        if service not in ("", SERVICE):
            return None
        return SERVING if self.state.ready else NOT_SERVING

    async def health_check(self, body: bytes, context):
        status = self.health(parsed(HealthCheckRequest, body).service)
        if status is None:
            raise ServiceError(404, "not_found", "unknown service")
        return HealthCheckResponse(status=status)

    async def health_watch(self, body: bytes, context):
        """The status now, then each change, until the client leaves (or the server stops)."""
        try:
            service = parsed(HealthCheckRequest, body).service
        except ServiceError as error:
            await context.abort(*status_of(error))
        last = None
        while True:
            status = self.health(service)
            status = HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                last = status
                yield HealthCheckResponse(status=status).SerializeToString()
            await asyncio.sleep(WATCH_EVERY_S)


# Codes that mean the server failed the call (an error on the trace span), not the client's request.
SERVER_FAILURES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.DATA_LOSS})


def server_options(settings, group: bool = False) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: messages up to ``SCS_MAX_BODY_BYTES`` (larger: RESOURCE_EXHAUSTED, from
    gRPC itself), the port shared by a group of workers or by no one, and the optional connection age."""
    options = [("grpc.max_receive_message_length", settings.max_body_bytes), ("grpc.max_send_message_length", -1),
               ("grpc.so_reuseport", 1 if group else 0)]
    if settings.grpc_max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(settings.graceful_timeout_s * 1000))]
    return options


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

