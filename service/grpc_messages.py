"""The gRPC messages of the Open Inference Protocol and of the health service, built at import from
``service/protos/descriptors.binpb`` (what grpcio-tools compiled from the ``.proto`` files beside it) in a
descriptor pool of their own.

Why not the usual generated ``_pb2`` modules: they register the protocol's messages (``inference.ModelInferRequest``
...) in protobuf's default pool, where tritonclient's and KServe's generated modules register the same names from
other files, and a process that imports two of them fails ("duplicate symbol"): a test, a benchmark client or an
application embedding the service would. A pool of our own cannot clash, and it ties the service to no protobuf
code-generator version (the descriptors are plain data; the classes are protobuf's own, upb-backed, as fast as
generated ones). Only the names and numbers reach the wire, so every client sees the standard service.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTORS = Path(__file__).resolve().parent / "protos" / "descriptors.binpb"

_files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes()).file
_pool = descriptor_pool.DescriptorPool()
_classes = message_factory.GetMessages(list(_files), pool=_pool)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"


def _message(name: str):
    return _classes[name]


ServerLiveRequest = _message("inference.ServerLiveRequest")
ServerLiveResponse = _message("inference.ServerLiveResponse")
ServerReadyRequest = _message("inference.ServerReadyRequest")
ServerReadyResponse = _message("inference.ServerReadyResponse")
ModelReadyRequest = _message("inference.ModelReadyRequest")
ModelReadyResponse = _message("inference.ModelReadyResponse")
ServerMetadataRequest = _message("inference.ServerMetadataRequest")
ServerMetadataResponse = _message("inference.ServerMetadataResponse")
ModelMetadataRequest = _message("inference.ModelMetadataRequest")
ModelMetadataResponse = _message("inference.ModelMetadataResponse")
ModelInferRequest = _message("inference.ModelInferRequest")
ModelInferResponse = _message("inference.ModelInferResponse")
InferParameter = _message("inference.InferParameter")
RepositoryIndexRequest = _message("inference.RepositoryIndexRequest")
RepositoryIndexResponse = _message("inference.RepositoryIndexResponse")
RepositoryModelLoadRequest = _message("inference.RepositoryModelLoadRequest")
RepositoryModelLoadResponse = _message("inference.RepositoryModelLoadResponse")
RepositoryModelUnloadRequest = _message("inference.RepositoryModelUnloadRequest")
RepositoryModelUnloadResponse = _message("inference.RepositoryModelUnloadResponse")
HealthCheckRequest = _message("grpc.health.v1.HealthCheckRequest")
HealthCheckResponse = _message("grpc.health.v1.HealthCheckResponse")


def methods(service: str) -> dict[str, tuple[type, type, bool]]:
    """Each method of ``service``: its request and response classes, and whether it streams its answers."""
    found = _pool.FindServiceByName(service)
    return {method.name: (_classes[method.input_type.full_name], _classes[method.output_type.full_name],
                          method.server_streaming) for method in found.methods}
