"""The Open Inference Protocol (KServe V2) over REST, on the same engines and batch queues as ``/classify``.

Input ``TEXT`` (BYTES, shape ``[n]`` or ``[n, 1]``); outputs ``PROBABILITIES`` (FP32 ``[n, num_classes]``) and
``LABEL`` (BYTES ``[n]``, the most likely class). Both JSON ``data`` and the binary tensor data extension are
read and written: with an ``Inference-Header-Content-Length`` header the body is that many bytes of JSON, then
the binary tensors in input order, each BYTES element a 4-byte little-endian length and its bytes (what
``tritonclient`` sends by default). The classification extension (``"parameters": {"classification": k}`` on an
output) answers ``"score:index:label"`` strings, as Triton does. Errors are ``{"error": "<message>"}``.

The infer route is a raw ASGI handler (the hot path); metadata, health and repository routes are in ``api.py``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import zlib
from dataclasses import dataclass

from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from contract import SELECTIVE_PRECISIONS

from .asgi import ClientGone, cancel_if_client_leaves, read_body, respond
from .engine import Classification, Engine
from .errors import ServiceError, new_error_id
from .logs import request_id
from .schemas import problem_with_text
from . import __version__
from .state import Phase, ServiceState

log = logging.getLogger("service.v2")

INPUT, PROBABILITIES, LABEL = "TEXT", "PROBABILITIES", "LABEL"
HEADER = "inference-header-content-length"
INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
BINARY = b"application/octet-stream"


# --- the protocol's shapes, for the OpenAPI document (the handlers below read and write them by hand) ---------------

class V2Error(BaseModel):
    error: str = Field(description="what went wrong")


class Tensor(BaseModel):
    name: str
    datatype: str = Field(description="BYTES for TEXT and LABEL, FP32 for PROBABILITIES")
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the versions served now")
    platform: str
    inputs: list[Tensor]
    outputs: list[Tensor]


class ModelReady(BaseModel):
    name: str
    version: str | None = None
    ready: bool
    error: str | None = None


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str | None = None


class Change(BaseModel):
    model: str
    version: int | None = None
    reason: str | None = None


class RepositoryChange(BaseModel):
    loaded: list[Change]
    retired: list[Change]
    refused: list[Change]


class InputTensor(BaseModel):
    name: str = Field(description="TEXT", json_schema_extra={"enum": [INPUT]})
    datatype: str = Field(description="BYTES", json_schema_extra={"enum": ["BYTES"]})
    shape: list[int] = Field(min_length=1, max_length=2, description="[n] or [n, 1]: n sentences")
    data: list[str] | None = Field(None, description="the n sentences (JSON), or absent with binary_data_size")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": bytes} with the binary '
                                              "extension: the tensor follows the JSON header")


class RequestedOutput(BaseModel):
    name: str = Field(description="PROBABILITIES or LABEL", json_schema_extra={"enum": [PROBABILITIES, LABEL]})
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true} and/or {"classification": k}')


class InferRequest(BaseModel):
    id: str | None = Field(None, description="echoed in the answer")
    parameters: dict[str, Any] | None = Field(None, description='"timeout" (microseconds), "binary_data_output", '
                                              '"min_score" or "min_precision" (abstain: LABEL "" below it)')
    inputs: list[InputTensor] = Field(min_length=1, max_length=1, description="one tensor: TEXT")
    outputs: list[RequestedOutput] | None = Field(None, min_length=1, max_length=2, description="default: every output")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "42", "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [2],
                                 "data": ["I still have not received my card", "How do I top up?"]}]},
        {"inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [1], "data": ["my card was stolen"]}],
         "outputs": [{"name": PROBABILITIES, "parameters": {"classification": 3}}]},
    ]})


class OutputTensor(Tensor):
    data: list[Any] | None = Field(None, description="row-major values (absent when sent as binary)")
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the one version that answered every sentence of this request")
    id: str | None = None
    outputs: list[OutputTensor]

    model_config = ConfigDict(protected_namespaces=())


def bad(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def v2_body(error: ServiceError) -> bytes:
    return orjson.dumps({"error": error.message})


def metadata(engine: Engine, versions: list[str]) -> dict:
    """Model metadata as the protocol states it (``GET /v2/models/{name}``)."""
    return {"name": engine.name, "versions": versions, "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(engine.labels)]},
                        {"name": LABEL, "datatype": "BYTES", "shape": [-1]}]}


@dataclass(frozen=True, slots=True)
class Wanted:
    """One requested output: its name, binary or JSON, and (classification extension) its top k."""

    name: str
    binary: bool
    classes: int = 0


class InferRoute:
    """``POST /v2/models/{name}[/versions/{version}]/infer``."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        settings = state.settings
        self.max_body, self.max_texts, self.max_chars = settings.max_body_bytes, settings.max_texts, settings.max_text_chars
        self.timeout_s = settings.request_timeout_s
        self.default_min_score = settings.min_score

    async def __call__(self, scope, receive, send) -> None:
        headers = None
        try:
            status, body = 200, await self._answer(scope, receive)
        except ServiceError as error:
            status, body, headers = error.status, v2_body(error), error.headers
        except (ClientGone, asyncio.CancelledError):
            self.state.metrics.reject("client_disconnected")
            return
        except Exception:
            error_id = new_error_id()
            log.exception("unhandled error in V2 infer", extra={"fields": {"error_id": error_id}})
            status, body, headers = 500, orjson.dumps({"error": f"unexpected server error (id {error_id})"}), None
        if isinstance(body, tuple):  # binary: (JSON part, binary part)
            header, blobs = body
            await respond(send, status, header + blobs, BINARY, {"Inference-Header-Content-Length": str(len(header))})
        else:
            await respond(send, status, body, headers=headers)

    async def _answer(self, scope, receive):
        self.state.serving()
        model, version = INFER.match(scope["path"]).groups()
        raw = await read_body(scope, receive, self.max_body)
        request, binary = self._split(scope, raw)
        request["parameters"] = an_object(request.get("parameters"), "'parameters'")
        if not isinstance(request.get("id", ""), (str, type(None))):
            raise bad("'id' must be a string")
        texts = self._texts(request, binary)
        timeout_s = self._timeout(request)
        # From here to the queue nothing awaits: the version routed to cannot leave the table in between.
        engine = self.state.repository.route(model, version)
        wanted = self._outputs(request, len(engine.labels))
        asked = self._fraction(request, "min_score"), self._fraction(request, "min_precision")
        if any(value is not None for value in asked) and any(o.classes for o in wanted):
            raise bad("parameters.min_score and min_precision do not apply to the classification extension "
                      "(its 'score:index:label' strings have no way to abstain): ask for LABEL without it")
        try:
            min_score = engine.min_score(*asked, self.default_min_score)
        except ServiceError as error:
            raise bad(error.details[0]["msg"] if error.details else error.message) from None
        stop_watching = cancel_if_client_leaves(scope, receive)
        try:
            result = await engine.classify(texts, request_id.get(), timeout_s)
        finally:
            stop_watching()
        abstained = [] if min_score is None else [s.probabilities[s.ranked[0]] < min_score for s in result.scores]
        if any(o.name == LABEL and not o.classes for o in wanted):
            engine.abstained(sum(abstained))  # counted where the answer shows it: an empty LABEL
        return self._render(request, result, wanted, abstained)

    @staticmethod
    def _fraction(request: dict, name: str) -> float | None:
        value = request["parameters"].get(name)
        if value is None:
            return None
        top = max(SELECTIVE_PRECISIONS) if name == "min_precision" else 1
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top or (
                name == "min_precision" and value == 0):
            raise bad(f"parameters.{name} must be a number in {f'(0, {top}]' if name == 'min_precision' else '[0, 1]'}"
                      f", got {value!r}")
        if name == "min_precision" and request["parameters"].get("min_score") is not None:
            raise bad("give at most one of parameters.min_score or parameters.min_precision")
        return float(value)

    def _split(self, scope, raw: bytes) -> tuple[dict, bytes]:
        """The JSON part (a dict) and the binary part of the body, decompressed if the client compressed it."""
        length, encoding = None, b""
        for name, value in scope["headers"]:
            if name == HEADER.encode():
                if not value.isdigit() or len(value) > 18:
                    raise bad(f"Inference-Header-Content-Length must be a byte count, got {value[:20]!r}")
                length = int(value)
            elif name == b"content-encoding":
                encoding = value.lower()
        if encoding in (b"gzip", b"deflate"):
            inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == b"gzip" else 0))
            try:
                raw = inflater.decompress(raw, self.max_body + 1)
            except zlib.error as error:
                raise bad(f"body is not valid {encoding.decode()} ({error})") from None
            if len(raw) > self.max_body or inflater.unconsumed_tail:
                raise ServiceError(413, "body_too_large", f"request body inflates past {self.max_body} bytes")
        elif encoding not in (b"", b"identity"):
            raise ServiceError(415, "unsupported_encoding", f"Content-Encoding {encoding.decode()!r} is not supported")
        if length is not None and length > len(raw):
            raise bad(f"Inference-Header-Content-Length is {length}, but the body has only {len(raw)} bytes")
        head, binary = (raw[:length], raw[length:]) if length is not None else (raw, b"")
        try:
            request = orjson.loads(head)
        except orjson.JSONDecodeError as error:
            raise bad(f"the inference request is not valid JSON ({error})") from None
        if not isinstance(request, dict):
            raise bad("the inference request must be a JSON object")
        return request, binary

    def _texts(self, request: dict, binary: bytes) -> list[str]:
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise bad("'inputs' must be a non-empty list of tensors")
        offset, texts = 0, None
        for tensor in inputs:
            if not isinstance(tensor, dict):
                raise bad("each input must be an object with name, shape, datatype and data")
            name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
            if name != INPUT:
                raise bad(f"unknown input {name!r}: this model takes one input, {INPUT!r} (BYTES, shape [-1])")
            if datatype != "BYTES":
                raise bad(f"input {INPUT!r} must have datatype BYTES, not {datatype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape) or len(shape) not in (1, 2) \
                    or (len(shape) == 2 and shape[1] != 1):
                raise bad(f"input {INPUT!r} must have shape [n] or [n, 1], not {shape!r}")
            count = shape[0]
            if not 1 <= count <= self.max_texts:
                raise bad(f"input {INPUT!r} holds {count} texts; between 1 and {self.max_texts} are allowed")
            size = an_object(tensor.get("parameters"), f"input {INPUT!r}: 'parameters'").get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                    raise bad(f"input {INPUT!r}: binary_data_size {size!r} runs past the end of the body "
                              f"({len(binary) - offset} binary bytes left)")
                elements = unpack_bytes(binary[offset:offset + size], count)
                offset += size
            else:
                elements = flatten(tensor.get("data"), len(shape))
                if elements is None or len(elements) != count:
                    raise bad(f"input {INPUT!r}: 'data' must hold {count} strings (its shape {shape}), flat or "
                              f"nested as the shape is")
            texts = [self._text(element, index) for index, element in enumerate(elements)]
        if offset != len(binary):
            raise bad(f"{len(binary) - offset} binary bytes after the last tensor the header describes")
        if len(inputs) != 1:
            raise bad(f"this model takes exactly one input, {INPUT!r}")
        return texts

    def _text(self, element, index: int) -> str:
        if isinstance(element, bytes):
            try:
                element = element.decode("utf-8")
            except UnicodeDecodeError as error:
                raise bad(f"input {INPUT!r} element {index} is not UTF-8 (byte {error.start})") from None
        if not isinstance(element, str):
            raise bad(f"input {INPUT!r} element {index} must be a string, not {type(element).__name__}")
        problem = problem_with_text(element, self.max_chars)
        if problem:
            raise bad(f"input {INPUT!r} element {index}: {problem[1]}")
        return element

    def _outputs(self, request: dict, classes: int) -> list[Wanted]:
        parameters = request["parameters"]
        binary_all = parameters.get("binary_data_output", False) is True
        outputs = request.get("outputs")
        if outputs is None:
            return [Wanted(PROBABILITIES, binary_all), Wanted(LABEL, binary_all)]
        if not isinstance(outputs, list) or not outputs:
            raise bad("'outputs' must be a non-empty list of requested outputs")
        wanted = []
        for output in outputs:
            name = output.get("name") if isinstance(output, dict) else None
            if name not in (PROBABILITIES, LABEL):
                raise bad(f"unknown output {name!r}: this model has {PROBABILITIES!r} and {LABEL!r}")
            options = an_object(output.get("parameters"), f"output {name!r}: 'parameters'")
            if any(w.name == name for w in wanted):
                raise bad(f"output {name!r} is requested twice")
            k = options.get("classification")
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= classes):
                raise bad(f"output {name!r}: classification must be an integer from 1 to {classes}, got {k!r}")
            wanted.append(Wanted(name, options.get("binary_data", binary_all) is True, k or 0))
        return wanted

    def _timeout(self, request: dict) -> float:
        """``parameters.timeout`` in microseconds, as Triton reads it; never longer than the server's own."""
        timeout = request["parameters"].get("timeout")
        if timeout is None:
            return self.timeout_s
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            raise bad(f"parameters.timeout must be a positive number of microseconds, got {timeout!r}")
        return min(self.timeout_s, timeout / 1e6)

    def _render(self, request: dict, result: Classification, wanted: list[Wanted], abstained: list[bool]):
        """The answer: header JSON (and the binary tensors). ``abstained``: per sentence, or empty (no threshold)."""
        count, labels = len(result.scores), result.labels
        outputs, blobs = [], []
        for output in wanted:
            if output.classes:
                datatype, shape = "BYTES", [count, output.classes]
                values = [f"{s.probabilities[i]:f}:{i}:{labels[i]}" for s in result.scores for i in s.ranked[:output.classes]]
            elif output.name == PROBABILITIES:
                datatype, shape = "FP32", [count, len(labels)]
                values = [s.probabilities for s in result.scores]
            else:
                datatype, shape = "BYTES", [count]
                values = [labels[s.ranked[0]] for s in result.scores]
                values = [("" if no else label) for label, no in zip(values, abstained)] if abstained else values
            tensor = {"name": output.name, "datatype": datatype, "shape": shape}
            if output.binary:
                blob = np.asarray(values, np.float32).tobytes() if datatype == "FP32" else pack_bytes(values)
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = [p for row in values for p in row] if datatype == "FP32" else values
            outputs.append(tensor)
        answer = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
        if request.get("id") is not None:
            answer["id"] = request["id"]
        header = orjson.dumps(answer)
        return (header, b"".join(blobs)) if blobs else header


def an_object(value, what: str) -> dict:
    """A JSON object field that may be absent or null (both: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be an object")
    return value


def flatten(data, depth: int) -> list | None:
    """A JSON tensor's elements in row-major order (the protocol allows nested lists), or None when ``data`` is not a
    list or nests deeper than ``depth`` (its shape's rank). Iterative: any nesting orjson accepts is answered 400."""
    if not isinstance(data, list):
        return None
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= depth:
                    return None
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def unpack_bytes(data: bytes, count: int) -> list[bytes]:
    """``count`` BYTES elements: each a 4-byte little-endian length, then that many bytes; nothing left over."""
    elements, position = [], 0
    for index in range(count):
        if position + 4 > len(data):
            raise bad(f"input {INPUT!r}: binary data ends inside element {index}'s length")
        (size,) = struct.unpack_from("<I", data, position)
        position += 4
        if position + size > len(data):
            raise bad(f"input {INPUT!r}: element {index} declares {size} bytes, only {len(data) - position} remain")
        elements.append(data[position:position + size])
        position += size
    if position != len(data):
        raise bad(f"input {INPUT!r}: {len(data) - position} bytes after its {count} elements")
    return elements


def pack_bytes(values: list[str]) -> bytes:
    parts = []
    for value in values:
        encoded = value.encode()
        parts += [struct.pack("<I", len(encoded)), encoded]
    return b"".join(parts)


# --- the routes off the hot path (on FastAPI, see api.py) --------------------------------------------------------

def add_routes(api, state: ServiceState) -> None:
    """Server metadata and health, model metadata and readiness, and the repository extension."""
    def answer(value: dict, status: int = 200, headers: dict | None = None) -> Response:
        return Response(orjson.dumps(value), status, headers, media_type="application/json")

    def error(failure: ServiceError) -> Response:
        return answer({"error": failure.message}, failure.status, failure.headers)

    def served(model: str, version: str | None) -> Engine:
        return state.repository.route(model, version)

    errors = {code: {"model": V2Error, "description": text} for code, text in (
        (400, "a bad request"), (403, "repository control is off"), (404, "no such model or version served"),
        (409, "several workers: use polling"),
        (503, "not ready"))}

    @api.get("/v2", summary="V2: server metadata", tags=["v2"], response_model=ServerMetadata)
    async def server_metadata() -> Response:
        return answer({"name": "sentence-classifier-service", "version": __version__,
                       "extensions": ["binary_tensor_data", "classification", "model_repository"]})

    @api.get("/v2/health/live", summary="V2: the server is alive (503 once it failed)", tags=["v2"],
             response_model=Live, responses={503: {"model": Live}})
    async def live() -> Response:
        failed = state.phase is Phase.FAILED
        return answer({"live": not failed}, 503 if failed else 200)

    @api.get("/v2/health/ready", summary="V2: the server is ready (503 while starting, draining or failed)",
             tags=["v2"], response_model=Ready, responses={503: {"model": Ready}})
    async def ready() -> Response:
        return answer({"ready": state.ready}, 200 if state.ready else 503, None if state.ready else {"Retry-After": "1"})

    async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
        try:
            engine = served(model_name, model_version)
        except ServiceError as failure:
            return error(failure)
        versions = [str(v) for v in sorted(state.repository.engines[model_name])]
        return answer(metadata(engine, versions if model_version is None else [engine.version]))

    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        try:
            engine = served(model_name, model_version)
        except ServiceError as failure:
            return answer({"name": model_name, "ready": False, "error": failure.message}, failure.status)
        ok = state.ready
        return answer({"name": engine.name, "version": engine.version, "ready": ok}, 200 if ok else 503)

    for path, endpoint, summary, shape in (
            ("/v2/models/{model_name}", model_metadata, "V2: model metadata (inputs, outputs, versions served)",
             ModelMetadata),
            ("/v2/models/{model_name}/versions/{model_version}", model_metadata, "V2: one version's metadata",
             ModelMetadata),
            ("/v2/models/{model_name}/ready", model_ready, "V2: the model is ready (its newest served version)",
             ModelReady),
            ("/v2/models/{model_name}/versions/{model_version}/ready", model_ready, "V2: this version is ready",
             ModelReady)):
        shown = {404: {"model": shape if shape is ModelReady else V2Error, "description": "not served"},
                 503: {"model": shape if shape is ModelReady else V2Error, "description": "not ready"}}
        api.add_api_route(path, endpoint, methods=["GET"], summary=summary, tags=["v2"], response_model=shape,
                          responses=shown)

    def control_allowed() -> ServiceError | None:
        settings = state.settings
        if state.metrics.multiprocess:  # each worker has its own repository: one request would change one of them
            return ServiceError(409, "conflict", "with several workers (SCS_WORKERS) the repository is changed on "
                                "disk and picked up by SCS_REPOSITORY_POLL_S; run one worker to use this API")
        if settings.api_key is None and not settings.allow_repository_control:
            return ServiceError(403, "forbidden", "repository control is off: set SCS_API_KEY (then it needs the key) "
                                "or SCS_ALLOW_REPOSITORY_CONTROL=true")
        return None

    @api.post("/v2/repository/index", summary="V2 repository extension: every model and its versions", tags=["v2"],
              response_model=list[IndexEntry])
    async def index() -> Response:
        rows = []
        for model in state.repository.describe():
            rows += [{"name": model["name"], "version": v["version"], "state": "READY"} for v in model["versions"]]
            rows += [{"name": model["name"], "version": v["version"], "state": "UNAVAILABLE", "reason": v["reason"]}
                     for v in model["refused"]]
            if not model["versions"] and not model["refused"]:
                rows.append({"name": model["name"], "state": "UNAVAILABLE", "reason": "unloaded"})
        return answer(rows)  # type: ignore[arg-type]

    @api.post("/v2/repository/models/{model_name}/load", tags=["v2"], response_model=RepositoryChange,
              responses={c: errors[c] for c in (400, 403, 404, 409)},
              summary="V2 repository extension: load (or reload) a model's versions as its policy chooses")
    async def load(model_name: str) -> Response:
        refused = control_allowed()
        if refused:
            return error(refused)
        if model_name not in state.repository.models:
            return error(not_found_model(model_name))
        changes = await state.repository.sync(model_name, retry_refused=True)
        serving = sorted(state.repository.engines.get(model_name, {}))
        if changes["refused"] or not serving:
            reasons = "; ".join(r["reason"] for r in changes["refused"]) or "no version chosen by the policy"
            still = f"; still serving version(s) {', '.join(map(str, serving))}" if serving else ""
            return answer({"error": f"model {model_name!r} failed to load: {reasons}{still}"}, 400)
        return answer(changes)

    @api.post("/v2/repository/models/{model_name}/unload", tags=["v2"], response_model=RepositoryChange,
              responses={c: errors[c] for c in (403, 404, 409)},
              summary="V2 repository extension: stop serving every version of a model (queued work finishes)")
    async def unload(model_name: str) -> Response:
        refused = control_allowed()
        if refused:
            return error(refused)
        try:
            return answer(await state.repository.unload(model_name))
        except ServiceError as failure:
            return error(failure)


def not_found_model(name: str) -> ServiceError:
    return ServiceError(404, "not_found", f"model {name!r} is not in the repository")
