"""The OpenAPI document states what the service enforces, so clients (and Schemathesis) can rely on it.

FastAPI generates the schema of the routes it serves. The hot route (``POST /classify``, a raw ASGI handler) is
described here from the same pydantic models that validate it. Neither knows the limits that come from settings
and the model (text length, texts per request, top_k range, "exactly one of text/texts", no control
characters), nor the shapes of the health endpoints, nor the bearer auth. ``document`` adds all of it once,
when the schema is first asked for.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from .schemas import TEXT_PATTERN, ClassifyRequest, ClassifyResponse, ErrorResponse
from .security import OPEN_PATHS
from .v2 import InferRequest, InferResponse, V2Error


_REF = "#/components/schemas/{model}"
_ERROR = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}
ERRORS = {
    "400": "malformed JSON or invalid UTF-8",
    "404": "no such model, or no such version of it served",
    "413": "body larger than SCS_MAX_BODY_BYTES",
    "422": "request does not match the schema (also: text too long, too many texts, top_k or priority out of range)",
    "500": "the model run failed (details.error_id is in the logs)",
    "503": "queue full, warming up or shutting down (Retry-After)",
    "504": "not answered within SCS_REQUEST_TIMEOUT_S",
}
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}


def document(app: FastAPI, *, max_text_chars: int, max_texts: int, num_classes: int, secured: bool,
             priority_levels: int = 1) -> None:
    """Make ``app.openapi()`` return the refined schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _classify(schema)
            _limits(schema, max_text_chars, max_texts, num_classes, priority_levels)
            _shapes(schema)
            if secured:
                _auth(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _classify(schema: dict) -> None:
    _, defs = models_json_schema([(ClassifyRequest, "validation"), (ClassifyResponse, "serialization"),
                                  (ErrorResponse, "serialization"), (InferRequest, "validation"),
                                  (InferResponse, "serialization"), (V2Error, "serialization")], ref_template=_REF)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    schema["paths"]["/classify"] = {"post": {
        "summary": "Classify",
        "operationId": "classify",
        "description": "Classify one sentence (`text`) or several (`texts`); predictions come back in input order.\n\n"
                       "Texts longer than the model's `max_length` tokens are cut and marked `truncated`.",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": _REF.format(model="ClassifyRequest")},
            "examples": {
                "one": {"summary": "one sentence", "value": {"text": "I still have not received my new card."}},
                "many": {"summary": "several sentences, top 3 classes",
                         "value": {"texts": ["How do I top up by card?", "My card was stolen"], "top_k": 3}},
            }}}},
        "responses": {"200": {"description": "the predictions, in input order", "content": {"application/json": {
            "schema": {"$ref": _REF.format(model="ClassifyResponse")}}}}}
        | {status: {"description": text, "content": _ERROR} for status, text in ERRORS.items()},
    }}
    v2_error = {"application/json": {"schema": {"$ref": _REF.format(model="V2Error")}}}
    for path, parameters in (("/v2/models/{model_name}/infer", ["model_name"]),
                             ("/v2/models/{model_name}/versions/{model_version}/infer", ["model_name", "model_version"])):
        schema["paths"][path] = {"post": {
            "summary": "V2: infer",
            "tags": ["v2"],
            "operationId": "infer" + ("_version" if "model_version" in parameters else ""),
            "description": "Open Inference Protocol inference on the TEXT input. JSON `data`, or the binary tensor "
                           "data extension: `Inference-Header-Content-Length: N` says the body starts with N bytes "
                           "of this JSON, followed by the binary tensors (each BYTES element a 4-byte little-endian "
                           "length and its bytes); outputs come back in binary when asked (`binary_data`). "
                           "`parameters.classification: k` on an output answers `score:index:label` strings.",
            "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                           for name in parameters],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": _REF.format(model="InferRequest")}}}},
            "responses": {"200": {"description": "one output tensor per requested output; with an output in binary "
                                                 "(binary_data), this JSON followed by the binary tensors",
                                  "content": {
                "application/json": {"schema": {"$ref": _REF.format(model="InferResponse")}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
            | {status: {"description": text, "content": v2_error} for status, text in (
                ("400", "the tensors do not fit the model (datatype, shape, binary sizes, UTF-8, outputs)"),
                ("404", "no such model or version served"), ("413", "body larger than SCS_MAX_BODY_BYTES"),
                ("415", "unsupported Content-Encoding"), ("500", "the model run failed"),
                ("503", "queue full, warming up or shutting down (Retry-After)"),
                ("504", "not answered within the request's timeout"))},
        }}


def _limits(schema: dict, max_text_chars: int, max_texts: int, num_classes: int, priority_levels: int) -> None:
    schemas = schema["components"]["schemas"]
    priority = [{"type": "integer", "minimum": 0, "maximum": priority_levels}, {"type": "null"}]
    schemas["RequestParameters"]["properties"]["priority"]["anyOf"] = priority
    request = schemas["ClassifyRequest"]
    text = {"type": "string", "minLength": 1, "maxLength": max_text_chars, "pattern": TEXT_PATTERN}
    fields = request["properties"]
    fields["text"]["anyOf"] = [text, {"type": "null"}]
    fields["texts"]["anyOf"] = [{"type": "array", "items": text, "minItems": 1, "maxItems": max_texts},
                                {"type": "null"}]
    fields["top_k"]["anyOf"] = [{"type": "integer", "minimum": 1, "maximum": num_classes}, {"type": "null"}]
    fields["priority"]["anyOf"] = priority
    request["oneOf"] = [  # exactly one of them given and not null
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["texts"], "properties": {"texts": {"type": "array"}}},
    ]
    request["not"] = {  # at most one threshold given and not null
        "required": ["min_score", "min_precision"],
        "properties": {"min_score": {"type": "number"}, "min_precision": {"type": "number"}},
    }


def _shapes(schema: dict) -> None:
    paths = schema["paths"]
    for path in ("/healthz", "/readyz"):
        paths[path]["get"]["responses"]["200"]["content"] = {"application/json": {"schema": _STATUS}}
    for path in ("/v1/model", "/v1/models"):
        paths[path]["get"]["responses"]["200"]["content"] = {"application/json": {"schema": {"type": "object"}}}
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}


def _auth(schema: dict) -> None:
    schema["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema["paths"].items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = {"description": "missing or wrong bearer token", "content": _ERROR}
