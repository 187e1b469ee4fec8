"""The OpenAPI document states what the service enforces, so clients (and Schemathesis) can rely on it.

FastAPI's generated schema knows the types but not the limits that come from settings and the model (text
length, texts per request, top_k range, "exactly one of text/texts", no control characters), nor the
shapes of the health endpoints, nor the bearer auth. ``document`` adds them once, when the schema is built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .security import OPEN_PATHS

# What schemas.check_text refuses, as one JSON-schema pattern: no C0/C1 control character except tab,
# newline and carriage return, and at least one character that is not whitespace.
_CONTROL = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
TEXT_PATTERN = rf"^[^{_CONTROL}]*[^\s{_CONTROL}][^{_CONTROL}]*$"

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}


def document(app: FastAPI, *, max_text_chars: int, max_texts: int, num_classes: int, secured: bool) -> None:
    """Make ``app.openapi()`` return the refined schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _limits(schema, max_text_chars, max_texts, num_classes)
            _shapes(schema)
            if secured:
                _auth(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _limits(schema: dict, max_text_chars: int, max_texts: int, num_classes: int) -> None:
    request = schema["components"]["schemas"]["ClassifyRequest"]
    text = {"type": "string", "minLength": 1, "maxLength": max_text_chars, "pattern": TEXT_PATTERN}
    fields = request["properties"]
    fields["text"]["anyOf"] = [text, {"type": "null"}]
    fields["texts"]["anyOf"] = [{"type": "array", "items": text, "minItems": 1, "maxItems": max_texts},
                                {"type": "null"}]
    fields["top_k"]["anyOf"] = [{"type": "integer", "minimum": 1, "maximum": num_classes}, {"type": "null"}]
    request["oneOf"] = [  # exactly one of them given and not null
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["texts"], "properties": {"texts": {"type": "array"}}},
    ]


def _shapes(schema: dict) -> None:
    paths = schema["paths"]
    for path in ("/healthz", "/readyz"):
        paths[path]["get"]["responses"]["200"]["content"] = {"application/json": {"schema": _STATUS}}
    paths["/v1/model"]["get"]["responses"]["200"]["content"] = {"application/json": {"schema": {"type": "object"}}}
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}


def _auth(schema: dict) -> None:
    schema["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema["paths"].items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = {"description": "missing or wrong bearer token", "content": _ERROR}
