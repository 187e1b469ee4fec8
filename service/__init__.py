"""Serve ONNX sentence classifiers over HTTP with dynamic batching (onnxruntime, never torch)."""

__version__ = "0.2.0"
