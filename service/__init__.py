"""Serve an ONNX sentence classifier over HTTP with dynamic batching (onnxruntime, never torch)."""
