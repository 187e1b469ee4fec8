"""Request validation (pydantic, strict) and the documented response shapes.

Responses on the hot path are built as plain dicts and serialized with orjson; the response models here
describe them for /docs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from contract import SELECTIVE_PRECISIONS

from .errors import ServiceError

# C0 controls except tab, newline and carriage return; DEL; C1 controls.
_CONTROL = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
CONTROL = re.compile(f"[{_CONTROL}]")
# Invisible format characters (Unicode category Cf: zero-width spaces and joiners, the byte-order mark, ...), as
# themselves: the same character class reads alike in Rust's regex, Python's and JSON Schema's.
_INVISIBLE = "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf")
# A text that can be classified, as one pattern: no control character other than tab, newline and carriage return,
# and at least one character that is neither whitespace nor invisible. pydantic checks it in Rust, with the length,
# so a hot request runs no Python validator per text (``problem_with_text`` says which rule a refused text broke).
TEXT_PATTERN = f"^[^{_CONTROL}]*[^\\s{_CONTROL}{_INVISIBLE}][^{_CONTROL}]*$"


@dataclass(frozen=True, slots=True)
class Limits:
    max_text_chars: int
    max_texts: int
    priority_levels: int = 1


EXAMPLE_TEXT = "I still have not received my new card, I ordered over a week ago."


class ClassifyRequest(BaseModel):
    """Exactly one of ``text`` or ``texts``."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"text": EXAMPLE_TEXT},
        {"texts": [EXAMPLE_TEXT, "How do I top up by card?"], "top_k": 3},
        {"text": EXAMPLE_TEXT, "model": "banking77", "version": "1"},
    ]}, protected_namespaces=())

    text: Annotated[str, Field(pattern=TEXT_PATTERN)] | None = Field(None, description="one sentence")
    texts: Annotated[list[Annotated[str, Field(pattern=TEXT_PATTERN)]], Field(min_length=1)] | None = Field(
        None, description="several sentences; answers come back in the same order")
    top_k: int | None = Field(None, description="how many classes to list in `probabilities` (default: server's; "
                              "at most the model's class count)")
    model: str | None = Field(None, description="which model of the repository (default: the default model)")
    version: str | None = Field(None, description="which of its served versions (default: the newest served)")
    min_score: float | None = Field(None, ge=0, le=1, description="abstain (`abstained: true`, `label: null`) "
                                    "when the most likely class's probability is below this (default: SCS_MIN_SCORE, "
                                    "else the model's own out-of-scope threshold if it has one; 0: never abstain)")
    min_precision: float | None = Field(None, gt=0, le=max(SELECTIVE_PRECISIONS), description="abstain below the "
                                        "threshold that reached this precision on the model's validation split (the "
                                        "manifest's `selective` thresholds, for "
                                        + ", ".join(map(str, SELECTIVE_PRECISIONS)) + ": the nearest one at or above "
                                        "it; 422 if this model version has none that high)")
    priority: int | None = Field(None, ge=0, description="the batch queue's priority level, numbered as Triton "
                                 "numbers them: 1 is the highest, up to SCS_PRIORITY_LEVELS; 0 or absent: the "
                                 "default level (SCS_DEFAULT_PRIORITY). Under load the highest level with work is "
                                 "served first, and a full queue refuses the lowest level first")
    cache: bool = Field(True, description="false: bypass the response cache (the model answers, nothing is "
                        "stored); so does the header `Cache-Control: no-cache`")

    @field_validator("top_k", "priority", mode="before")
    @classmethod
    def _whole_number(cls, value: object) -> object:
        """JSON (and JSON Schema's "integer") treats 3.0 as the integer 3; strict mode alone would refuse it."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise PydanticCustomError("top_k_out_of_range", "top_k must be at least 1")
        return value

    @classmethod
    def within(cls, limits: Limits) -> type[ClassifyRequest]:
        """This model with the server's limits on text length and count (checked in Rust, as the pattern is)."""
        text = Annotated[str, Field(max_length=limits.max_text_chars, pattern=TEXT_PATTERN)]
        return create_model(cls.__name__, __base__=cls, __doc__=cls.__doc__,
                            priority=(Annotated[int, Field(ge=0, le=limits.priority_levels)] | None,
                                      cls.model_fields["priority"]),
                            text=(text | None, cls.model_fields["text"]),
                            texts=(Annotated[list[text], Field(min_length=1, max_length=limits.max_texts)] | None,
                                   cls.model_fields["texts"]))

    @model_validator(mode="after")
    def _one_of(self) -> "ClassifyRequest":
        if (self.text is None) == (self.texts is None):
            raise PydanticCustomError("text_or_texts", "give exactly one of 'text' or 'texts'")
        if self.min_score is not None and self.min_precision is not None:
            raise PydanticCustomError("min_score_or_min_precision", "give at most one of 'min_score' or "
                                      "'min_precision'")
        return self


def problem_with_text(text: str, max_chars: int) -> tuple[str, str] | None:
    """Why ``text`` cannot be classified, as (error type, message), or None: the rule /classify and V2 share."""
    if len(text) > max_chars:
        return "text_too_long", f"text has {len(text)} characters; the limit is {max_chars}"
    if blank(text):
        return "empty_text", "text is empty or only whitespace and invisible characters"
    match = CONTROL.search(text)
    if match:
        return "control_character", f"text holds control character U+{ord(match.group()):04X} at index {match.start()}"
    return None


def priority_problem(value: object, levels: int | None) -> str:
    """What is wrong with a priority out of range (/classify's field, V2's parameter); ``levels`` None: it is
    negative."""
    if levels is None:
        return f"priority must be 0 (the default level) or a level from 1 (the highest) down, not {value!r}"
    return f"priority must be 0 (the default level) or a level from 1 (the highest) to {levels}, not {value!r}"


def blank(text: str) -> bool:
    """Nothing to classify: only whitespace and invisible format characters (zero-width spaces and joiners, the
    byte-order mark: Unicode category Cf), which tokenizers drop."""
    stripped = text.strip()
    if not stripped or stripped.isascii():
        return not stripped
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in stripped)


def top_k_out_of_range(num_classes: int) -> ServiceError:
    return ServiceError(422, "invalid_request", "the request does not match the schema", [
        {"loc": ["top_k"], "type": "top_k_out_of_range", "msg": f"top_k must be between 1 and {num_classes}"}])


class Prediction(BaseModel):
    label: str | None = Field(description="the most likely class; null when the service abstained")
    score: float = Field(description="the most likely class's probability")
    abstained: bool = Field(description="the score was below the request's min_score (or min_precision's "
                            "threshold, or SCS_MIN_SCORE): no class is claimed; probabilities are still listed")
    probabilities: dict[str, float] = Field(description="the top_k classes and their probabilities, most likely first")
    truncated: bool = Field(description="the text had more tokens than the model's max_length and was cut")
    labels: list[str] | None = Field(None, description="a multi-label model only: every label whose probability is "
                                     "at or above the threshold (min_score, else the model's, 0.5), most likely "
                                     "first; `label` is the first of them and `abstained` means there is none")


class ClassifyResponse(BaseModel):
    model: str = Field(description="the model that answered")
    version: str = Field(description="its version: every prediction of one answer comes from this one version")
    predictions: list[Prediction]
    multi_label: bool | None = Field(None, description="true for a multi-label model (a sigmoid per class: the "
                                     "probabilities do not sum to 1, and each prediction lists its `labels`)")

    model_config = ConfigDict(protected_namespaces=(), json_schema_extra={"examples": [{
        "model": "banking77", "version": "1",
        "predictions": [{"label": "card_arrival", "score": 0.93, "truncated": False, "abstained": False,
                         "probabilities": {"card_arrival": 0.93, "card_delivery_estimate": 0.05,
                                           "lost_or_stolen_card": 0.01}}],
    }]})


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_request, queue_full")
    message: str
    details: Any = Field(None, description="per-field problems for invalid_request; error_id for model_error")


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_details(errors: list[dict]) -> list[dict]:
    """pydantic's errors without the (possibly huge) input values, JSON-safe."""
    return [{"loc": list(e["loc"]), "type": e["type"], "msg": e["msg"]} for e in errors]


def invalid_request(raw: bytes, problems: list[dict]) -> ServiceError:
    """400 for a body that is not JSON (or not UTF-8), else 422 listing what does not match the schema, the texts'
    constraints named by the rule they broke."""
    if problems and problems[0]["type"] == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return ServiceError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {error.start})")
        return ServiceError(400, "malformed_json", f"request body is not valid JSON: {problems[0]['msg']}")
    return ServiceError(422, "invalid_request", "the request does not match the schema",
                        error_details([_named(problem) for problem in problems]))


def _named(problem: dict) -> dict:
    """A text constraint pydantic checked (length, pattern, count) as the rule it is: ``text_too_long``,
    ``empty_text``, ``control_character``, ``too_many_texts``, ``empty_texts``."""
    kind, field, value = problem["type"], problem["loc"][:1], problem.get("input")
    if field == ("priority",) and kind in ("less_than_equal", "greater_than_equal"):
        return problem | {"type": "priority_out_of_range", "msg": priority_problem(value, problem["ctx"].get("le"))}
    if field not in (("text",), ("texts",)):
        return problem
    if kind == "string_too_long":
        limit = problem["ctx"]["max_length"]
        return problem | {"type": "text_too_long", "msg": f"text has {len(value)} characters; the limit is {limit}"}
    if kind == "string_pattern_mismatch" and isinstance(value, str):
        broken = problem_with_text(value, len(value))
        return problem | ({"type": broken[0], "msg": broken[1]} if broken else {})
    if kind == "too_long" and problem["loc"] == ("texts",):
        return problem | {"type": "too_many_texts", "msg": f"{len(value)} texts; the limit is "
                                                           f"{problem['ctx']['max_length']} per request"}
    if kind == "too_short" and problem["loc"] == ("texts",):
        return problem | {"type": "empty_texts", "msg": "texts must hold at least one text"}
    return problem
