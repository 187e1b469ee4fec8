"""Serve ONNX sentence classifiers over HTTP with dynamic batching (onnxruntime, never torch)."""

import os

__version__ = "0.2.0"

# Each server process runs one event loop, the batch queue's tokenizing included, on about one core: the tokenizer's
# own thread pool would only spin beside it (README, "Hot path"). A value set by the user wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
