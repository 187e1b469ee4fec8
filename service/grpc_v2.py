"""The Open Inference Protocol (KServe V2) over gRPC: ``ModelInfer``'s request and answer, and every error as a gRPC
status. It is V2 REST's protocol (``service.v2``) in another encoding: the request is validated by the same pydantic
models (so the same parameters, limits and messages), its texts checked by the same functions, its outputs chosen
and filled by the same code; ``service.grpc_server`` makes the one engine call (``service.calls.infer``) between
``parse`` and ``render``.

Input ``TEXT``: BYTES elements in ``contents.bytes_contents``, or in ``raw_input_contents`` (each a 4-byte
little-endian length, then the bytes: what tritonclient sends). The answer carries its tensors the way the request
carried its input: in ``raw_output_contents`` (FP32 little-endian, BYTES length-prefixed) after raw input, in typed
``contents`` otherwise. The deadline is the call's gRPC deadline (and the ``timeout`` parameter in microseconds, as
Triton reads it), at most ``SCS_REQUEST_TIMEOUT_S``.
"""

from __future__ import annotations

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from .calls import Call
from .engine import Answer
from .errors import ServiceError
from .grpc_messages import ModelInferRequest, ModelInferResponse
from .settings import Settings
from .v2 import INPUT, call_of, check_count, check_outputs, error_message, outputs, text_of, validated
from .v2_tensors import bad, pack_bytes, unpack_bytes

Code = grpc.StatusCode

# ServiceError.status -> gRPC status code, and the error codes that map otherwise. 413 is RESOURCE_EXHAUSTED: what
# gRPC itself answers for a message over the receive limit (SCS_MAX_BODY_BYTES), so an oversize call gets one code
# whichever of the two refuses it.
CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND,
         405: Code.UNIMPLEMENTED, 409: Code.FAILED_PRECONDITION, 413: Code.RESOURCE_EXHAUSTED,
         415: Code.INVALID_ARGUMENT, 422: Code.INVALID_ARGUMENT, 500: Code.INTERNAL, 503: Code.UNAVAILABLE,
         504: Code.DEADLINE_EXCEEDED}
BY_ERROR = {"queue_full": Code.RESOURCE_EXHAUSTED, "internal_error": Code.UNKNOWN}  # UNKNOWN: a bug, not the model


def status_of(error: ServiceError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message of an error (the message is V2 REST's)."""
    return BY_ERROR.get(error.code) or CODES.get(error.status, Code.UNKNOWN), error_message(error)


def parameters_of(parameters) -> dict | None:
    """A protobuf parameter map as the JSON the V2 models read (None when empty)."""
    if not parameters:
        return None
    return {key: getattr(value, value.WhichOneof("parameter_choice")) if value.WhichOneof("parameter_choice")
            else None for key, value in parameters.items()}


def parsed(message_class, body: bytes):
    """A request message from its bytes; a 400 (INVALID_ARGUMENT) when they are not one."""
    try:
        return message_class.FromString(body)
    except DecodeError as error:
        raise bad(f"the request is not a valid {message_class.DESCRIPTOR.name} ({error})") from None


class GrpcV2Protocol:
    """``inference.GRPCInferenceService/ModelInfer``: ``parse`` takes the serialized request and the call's gRPC
    context (its deadline); ``render`` gives the ``ModelInferResponse``; ``error`` a (status code, message) pair."""

    def __init__(self, settings: Settings) -> None:
        self.max_texts, self.max_chars = settings.max_texts, settings.max_text_chars
        self.timeout_s, self.priority_levels = settings.request_timeout_s, settings.priority_levels

    def parse(self, context, body: bytes) -> Call:
        message = parsed(ModelInferRequest, body)
        request = validated({
            "id": message.id or None, "parameters": parameters_of(message.parameters),
            "inputs": [{"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                        "parameters": parameters_of(tensor.parameters)} for tensor in message.inputs],
            "outputs": [{"name": requested.name, "parameters": parameters_of(requested.parameters)}
                        for requested in message.outputs] or None})
        raw = bool(message.raw_input_contents)
        texts = self._texts(message, request.inputs[0].shape, raw)
        deadline = context.time_remaining() if context is not None else None
        call = call_of(request, texts, message.model_name, message.model_version or None, self.timeout_s,
                       self.priority_levels, deadline)
        call.view = (request, raw)
        return call

    def _texts(self, message, shape: list[int], raw: bool) -> list[str]:
        count = shape[0]
        check_count(count, self.max_texts)
        tensor = message.inputs[0]
        if raw:
            if len(message.raw_input_contents) != 1:
                raise bad(f"raw_input_contents holds {len(message.raw_input_contents)} tensors; the request has one "
                          f"input, {INPUT!r}")
            if tensor.HasField("contents"):
                raise bad(f"input {INPUT!r} has both contents and raw_input_contents: send one")
            elements = unpack_bytes(message.raw_input_contents[0], count, INPUT)
        else:
            contents = tensor.contents
            others = [field.name for field, _ in contents.ListFields() if field.name != "bytes_contents"]
            if others:
                raise bad(f"input {INPUT!r} is BYTES: its elements go in contents.bytes_contents, not {others[0]}")
            elements = contents.bytes_contents
            if len(elements) != count:
                raise bad(f"input {INPUT!r}: contents.bytes_contents must hold {count} elements (its shape {shape}), "
                          f"not {len(elements)}")
        return [text_of(element, index, self.max_chars) for index, element in enumerate(elements)]

    def check(self, call: Call, labels: list[str]) -> None:
        check_outputs(call.view[0], labels)

    def render(self, call: Call, answer: Answer) -> ModelInferResponse:
        request, raw = call.view
        response = ModelInferResponse(model_name=answer.model, model_version=answer.version, id=request.id or "")
        for name, datatype, shape, values, _ in outputs(request, answer):
            tensor = response.outputs.add(name=name, datatype=datatype, shape=shape)
            if datatype == "FP32":
                flat = np.asarray(values, np.float32).ravel()
                if raw:
                    response.raw_output_contents.append(flat.tobytes())
                else:
                    tensor.contents.fp32_contents.extend(flat.tolist())
            elif raw:
                response.raw_output_contents.append(pack_bytes(values))
            else:
                tensor.contents.bytes_contents.extend(value.encode() for value in values)
        return response

    def error(self, error: ServiceError) -> tuple[grpc.StatusCode, str]:
        return status_of(error)
