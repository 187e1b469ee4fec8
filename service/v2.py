"""The Open Inference Protocol (KServe V2) over REST: its infer request and answer, on the hot route's one path
(``service.hot_route``) and so on the same engines and batch queues as ``/classify``.

Input ``TEXT`` (BYTES, shape ``[n]`` or ``[n, 1]``); outputs ``PROBABILITIES`` (FP32 ``[n, num_classes]``) and
``LABEL`` (BYTES ``[n]``, the most likely class; empty where a ``min_score`` or ``min_precision`` parameter made
the prediction abstain). JSON ``data`` and the binary tensor data extension are both read and written
(``service.v2_tensors``). The classification extension (``"parameters": {"classification": k}`` on an output)
answers Triton's ``"score:index:label"`` strings. Errors are ``{"error": "<message>"}``; a request that breaks the
schema is a 400, as Triton answers. The request is validated by the pydantic models below, which also document it;
the metadata, health and repository routes are in ``service.routes``. V2 over gRPC (``service.grpc_v2``) validates
its requests with the same models and shares the request's meaning, its texts and its outputs (the functions below
``validated``), so the two transports differ only in their encoding.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from contract import SELECTIVE_PRECISIONS

from . import __version__
from .calls import Call, Reply
from .engine import Answer
from .errors import ServiceError
from .hot_route import JSON, no_cache
from .schemas import priority_problem, problem_with_text
from .settings import Settings
from .v2_tensors import bad, flatten, output, split, unpack_bytes

INPUT, PROBABILITIES, LABEL = "TEXT", "PROBABILITIES", "LABEL"
INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
BINARY = b"application/octet-stream"


def _refuse(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message.replace("{", "{{").replace("}", "}}"))


# --- the infer request: these models validate it and document it (/docs) --------------------------------------------

class InputParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    binary_data_size: int | None = Field(None, ge=0, description="bytes of this tensor in the binary part")


class InputTensor(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(description="TEXT", json_schema_extra={"enum": [INPUT]})
    datatype: str = Field(description="BYTES", json_schema_extra={"enum": ["BYTES"]})
    shape: list[int] = Field(description="[n] or [n, 1]: n sentences")
    data: list[Any] | None = Field(None, description="the n sentences (JSON), or absent with binary_data_size")
    parameters: InputParameters | None = Field(None, description='{"binary_data_size": bytes} with the binary '
                                               "extension: the tensor follows the JSON header")

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: object) -> object:
        if value != INPUT:
            raise _refuse("unknown_input", f"unknown input {value!r}: this model takes one input, {INPUT!r} "
                                           "(BYTES, shape [-1])")
        return value

    @field_validator("datatype", mode="before")
    @classmethod
    def _datatype(cls, value: object) -> object:
        if value != "BYTES":
            raise _refuse("datatype", f"input {INPUT!r} must have datatype BYTES, not {value!r}")
        return value

    @field_validator("shape", mode="before")
    @classmethod
    def _shape(cls, value: object) -> object:
        if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in value) or len(value) not in (1, 2) \
                or (len(value) == 2 and value[1] != 1):
            raise _refuse("shape", f"input {INPUT!r} must have shape [n] or [n, 1], not {value!r}")
        return value


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    binary_data: bool | None = Field(None, description="this output in the binary part")
    classification: int | None = Field(None, description="the top k classes as 'score:index:label' strings")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(description="PROBABILITIES or LABEL", json_schema_extra={"enum": [PROBABILITIES, LABEL]})
    parameters: OutputParameters | None = Field(None, description='{"binary_data": true} and/or '
                                                '{"classification": k}')

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: object) -> object:
        if value not in (PROBABILITIES, LABEL):
            raise _refuse("unknown_output", f"unknown output {value!r}: this model has {PROBABILITIES!r} and "
                                            f"{LABEL!r}")
        return value


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    timeout: int | None = Field(None, gt=0, description="microseconds (as Triton reads it); at most the server's")
    binary_data_output: bool | None = Field(None, description="every output in the binary part")
    min_score: float | None = Field(None, ge=0, le=1, description="abstain (LABEL '') below this top score")
    min_precision: float | None = Field(None, gt=0, le=max(SELECTIVE_PRECISIONS), description="abstain below the "
                                        "threshold that reached this precision on the model's validation split")
    priority: int | None = Field(None, ge=0, description="the batch queue's priority level as Triton numbers it: 1 "
                                 "the highest, up to SCS_PRIORITY_LEVELS; 0: the default level")
    cache: bool | None = Field(None, description="false: bypass the response cache (the header `Cache-Control: "
                               "no-cache` does too)")

    @field_validator("min_score", "min_precision", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_threshold(self) -> "RequestParameters":
        if self.min_score is not None and self.min_precision is not None:
            raise _refuse("min_score_or_min_precision", "give at most one of parameters.min_score or "
                                                        "parameters.min_precision")
        return self


class InferRequest(BaseModel):
    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [
        {"id": "42", "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [2],
                                 "data": ["I still have not received my card", "How do I top up?"]}]},
        {"inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [1], "data": ["my card was stolen"]}],
         "outputs": [{"name": PROBABILITIES, "parameters": {"classification": 3}}]},
    ]})

    id: str | None = Field(None, description="echoed in the answer")
    parameters: RequestParameters | None = None
    inputs: list[InputTensor] = Field(description="one tensor: TEXT")
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output")

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input(cls, value: object) -> object:
        if not isinstance(value, list) or len(value) != 1:
            raise _refuse("inputs", f"'inputs' must be a non-empty list of tensors: this model takes exactly one "
                                    f"input, {INPUT!r}")
        return value

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: object) -> object:
        if value is not None and (not isinstance(value, list) or not value):
            raise _refuse("outputs", "'outputs' must be a non-empty list of requested outputs")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "InferRequest":
        names = [o.name for o in self.outputs or ()]
        if len(set(names)) != len(names):
            raise _refuse("outputs", "an output is requested twice")
        thresholds = self.parameters is not None and (self.parameters.min_score is not None
                                                      or self.parameters.min_precision is not None)
        if thresholds and any(o.parameters and o.parameters.classification for o in self.outputs or ()):
            raise _refuse("classification", "parameters.min_score and min_precision do not apply to the "
                                            "classification extension (its 'score:index:label' strings have no way "
                                            "to abstain): ask for LABEL without it")
        return self


# --- the answer, for the OpenAPI document --------------------------------------------------------------------------

class V2Error(BaseModel):
    error: str = Field(description="what went wrong")


class Tensor(BaseModel):
    name: str
    datatype: str = Field(description="BYTES for TEXT and LABEL, FP32 for PROBABILITIES")
    shape: list[int]


class OutputTensor(Tensor):
    data: list[Any] | None = Field(None, description="row-major values (absent when sent as binary)")
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the one version that answered every sentence of this request")
    id: str | None = None
    outputs: list[OutputTensor]

    model_config = ConfigDict(protected_namespaces=())


SERVER_METADATA = {"name": "sentence-classifier-service", "version": __version__,
                   "extensions": ["binary_tensor_data", "classification", "model_repository"]}


def metadata(name: str, labels: list[str], versions: list[str], multi_label: bool = False) -> dict:
    """Model metadata as the protocol states it (``GET /v2/models/{name}``); ``parameters`` says whether the model
    is multi-label (PROBABILITIES then holds a sigmoid per class, and LABEL the most likely label at or above the
    threshold)."""
    return {"name": name, "versions": versions, "platform": "onnxruntime_onnx",
            "parameters": {"multi_label": multi_label},
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(labels)]},
                        {"name": LABEL, "datatype": "BYTES", "shape": [-1]}]}


def error_message(error: ServiceError) -> str:
    """The protocol's error (REST and gRPC): one message; a schema problem says what it is."""
    if error.status == 422 and isinstance(error.details, list) and error.details:
        return error.details[0]["msg"]
    return error.message


def error_body(error: ServiceError) -> bytes:
    """The REST error: ``{"error": message}``. A schema problem (422 elsewhere) is a 400 here, as Triton answers."""
    return orjson.dumps({"error": error_message(error)})


def v2_status(error: ServiceError) -> int:
    return 400 if error.status == 422 else error.status


# --- what REST and gRPC share: the request's meaning, its texts, its outputs -----------------------------------------

def validated(request: object) -> InferRequest:
    """The infer request as the models above read it (a dict from the gRPC message); 400 with the first problem."""
    try:
        return InferRequest.model_validate(request)
    except ValidationError as error:
        raise bad(validation_message(error)) from None


def call_of(request: InferRequest, texts: list[str], model: str | None, version: str | None, server_timeout_s: float,
            priority_levels: int, deadline_s: float | None = None, cached: bool = True) -> Call:
    """The engine call a validated request makes: its thresholds, its deadline (``parameters.timeout`` in
    microseconds, as Triton reads it, and the transport's own ``deadline_s`` where it has one; at most the
    server's), its priority level (``parameters.priority``: Triton's numbering, 1 the highest, 0 the default; a 400
    beyond ``priority_levels``, where Triton would fall back to the default) and whether it may use the response
    cache (``parameters.cache``, and ``cached``: what the transport says)."""
    parameters = request.parameters or RequestParameters()
    timeout = None if parameters.timeout is None else min(server_timeout_s, parameters.timeout / 1e6)
    if deadline_s is not None:
        timeout = deadline_s if timeout is None else min(timeout, deadline_s)
    if parameters.priority is not None and parameters.priority > priority_levels:
        raise bad(f"parameters.{priority_problem(parameters.priority, priority_levels)}")
    return Call(texts, model, version, parameters.min_score, parameters.min_precision, timeout, request,
                parameters.priority or None, cached and parameters.cache is not False)


def check_count(count: int, max_texts: int) -> None:
    if not 1 <= count <= max_texts:
        raise bad(f"input {INPUT!r} holds {count} texts; between 1 and {max_texts} are allowed")


def text_of(element, index: int, max_chars: int) -> str:
    """One element of ``TEXT`` (bytes or str) as the text it must be: UTF-8, and what /classify accepts."""
    if isinstance(element, bytes):
        try:
            element = element.decode("utf-8")
        except UnicodeDecodeError as error:
            raise bad(f"input {INPUT!r} element {index} is not UTF-8 (byte {error.start})") from None
    if not isinstance(element, str):
        raise bad(f"input {INPUT!r} element {index} must be a string, not {type(element).__name__}")
    problem = problem_with_text(element, max_chars)
    if problem:
        raise bad(f"input {INPUT!r} element {index}: {problem[1]}")
    return element


def check_outputs(request: InferRequest, labels: list[str]) -> None:
    """What depends on the model: a classification count within its classes."""
    for requested in request.outputs or ():
        k = requested.parameters.classification if requested.parameters else None
        if k is not None and not 1 <= k <= len(labels):
            raise bad(f"output {requested.name!r}: classification must be an integer from 1 to {len(labels)}, "
                      f"got {k}")


def outputs(request: InferRequest, answer: Answer, binary_all: bool = False) -> list[tuple[str, str, list[int],
                                                                                           list, bool]]:
    """The output tensors the request asked for (default: every output), each as (name, datatype, shape, values,
    binary): rows of floats for FP32, strings for BYTES; ``binary``: the REST binary extension's choice."""
    wanted = [(o.name, (o.parameters.binary_data if o.parameters and o.parameters.binary_data is not None
                        else binary_all), (o.parameters.classification or 0) if o.parameters else 0)
              for o in request.outputs] if request.outputs else [(PROBABILITIES, binary_all, 0), (LABEL, binary_all, 0)]
    count, labels, scores = len(answer.scores), answer.labels, answer.scores
    tensors = []
    for name, binary, k in wanted:
        if k:
            values = [f"{s.probabilities[i]:f}:{i}:{labels[i]}" for s in scores for i in s.ranked[:k]]
            tensors.append((name, "BYTES", [count, k], values, binary))
        elif name == PROBABILITIES:
            tensors.append((name, "FP32", [count, len(labels)], [s.probabilities for s in scores], binary))
        else:
            abstained = answer.abstained or [False] * count
            values = ["" if no else labels[s.ranked[0]] for s, no in zip(scores, abstained)]
            tensors.append((name, "BYTES", [count], values, binary))
    return tensors


# --- the wire protocol ---------------------------------------------------------------------------------------------

class V2Protocol:
    """``POST /v2/models/{name}[/versions/{version}]/infer``."""

    def __init__(self, settings: Settings) -> None:
        self.max_body, self.max_texts, self.max_chars = (settings.max_body_bytes, settings.max_texts,
                                                         settings.max_text_chars)
        self.timeout_s, self.priority_levels = settings.request_timeout_s, settings.priority_levels

    def parse(self, scope, body: bytes) -> Call:
        model, version = INFER.match(scope["path"]).groups()
        head, binary = split(scope["headers"], body, self.max_body)
        try:
            request = InferRequest.model_validate_json(head)
        except ValidationError as error:
            raise bad(validation_message(error)) from None
        return call_of(request, self._texts(request.inputs[0], binary), model, version, self.timeout_s,
                       self.priority_levels, cached=not no_cache(scope))

    def _texts(self, tensor: InputTensor, binary: bytes) -> list[str]:
        count = tensor.shape[0]
        check_count(count, self.max_texts)
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        if size is not None:
            if size > len(binary):
                raise bad(f"input {INPUT!r}: binary_data_size {size} runs past the end of the body ({len(binary)} "
                          f"binary bytes left)")
            if size != len(binary):
                raise bad(f"{len(binary) - size} binary bytes after the last tensor the header describes")
            elements = unpack_bytes(binary, count, INPUT)
        else:
            if binary:
                raise bad(f"{len(binary)} binary bytes after the last tensor the header describes")
            elements = flatten(tensor.data, len(tensor.shape))
            if elements is None or len(elements) != count:
                raise bad(f"input {INPUT!r}: 'data' must hold {count} strings (its shape {tensor.shape}), flat or "
                          f"nested as the shape is")
        return [text_of(element, index, self.max_chars) for index, element in enumerate(elements)]

    def check(self, call: Call, labels: list[str]) -> None:
        check_outputs(call.view, labels)

    def render(self, call: Call, answer: Answer) -> Reply:
        request: InferRequest = call.view
        binary_all = bool(request.parameters and request.parameters.binary_data_output)
        tensors, blobs = [], []
        for name, datatype, shape, values, binary in outputs(request, answer, binary_all):
            tensor, blob = output(name, datatype, shape, values, binary)
            tensors.append(tensor)
            blobs.append(blob)
        body = {"model_name": answer.model, "model_version": answer.version, "outputs": tensors}
        if request.id is not None:
            body["id"] = request.id
        header, blob = orjson.dumps(body), b"".join(blobs)
        if not blob:
            return 200, header, JSON, None
        return 200, header + blob, BINARY, {"Inference-Header-Content-Length": str(len(header))}

    def error(self, error: ServiceError) -> Reply:
        return v2_status(error), error_body(error), JSON, error.headers


def validation_message(error: ValidationError) -> str:
    """One line for the first problem: the JSON parser's, or where in the request and what."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return f"the inference request is not valid JSON ({first['msg']})"
    if first["type"] == "model_type" and not first["loc"]:
        return "the inference request must be a JSON object"
    where = ".".join(map(str, first["loc"]))
    if first["type"] == "missing" and first["loc"] == ("inputs",):
        return f"'inputs' must be a non-empty list of tensors: this model takes one input, {INPUT!r}"
    if first["type"] in ("unknown_input", "datatype", "shape", "unknown_output", "inputs", "outputs",
                         "classification", "min_score_or_min_precision"):
        return first["msg"]
    return f"{where}: {first['msg']}" if where else first["msg"]
