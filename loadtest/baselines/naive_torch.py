"""The naive baseline: a minimal FastAPI app that runs a torch model once per request, no batching.

It is what a first deployment usually looks like: a sync endpoint (FastAPI's thread pool), the model
loaded once, one forward pass per request. The model has the artifact's architecture and shape
(``SentenceClassifier`` with the manifest's vocab size, classes and layer sizes) and tokenizes with the
artifact's ``tokenizer.json``, but its weights are random: the point is the per-request torch cost,
not accuracy (the artifact ships only ONNX).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from fastapi import FastAPI
from tokenizers import Tokenizer

from model_export.model import ModelShape, SentenceClassifier
from model_export.train import pad_batch

from .common import ClassifyRequest, parser, prediction, run

app = FastAPI(title="naive torch baseline")
STATE: dict = {}


def load(folder: Path) -> None:
    """Shape the model like the artifact: sizes from its manifest, ``ModelShape`` defaults for anything missing."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    config = manifest.get("training", {}).get("config", {})
    sizes = {key: config[key] for key in ("embedding_dim", "hidden_size", "bidirectional") if key in config}
    shape = ModelShape(vocab_size=manifest["vocab_size"], num_classes=manifest["num_classes"],
                       pad_id=manifest["pad_id"], **sizes)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    STATE.update(model=SentenceClassifier(shape).eval(), manifest=manifest,
                 tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
                 labels=json.loads((folder / "labels.json").read_text(encoding="utf-8")))


@app.post("/classify")
def classify(request: ClassifyRequest) -> dict:
    manifest, texts = STATE["manifest"], request.all_texts()
    # model_export.tokenizer.encode, keeping each text's full length to report truncation
    encodings = STATE["tokenizer"].encode_batch(texts, add_special_tokens=False)
    sequences = [e.ids[: manifest["max_length"]] or [manifest["unk_id"]] for e in encodings]
    cut = [len(e.ids) > manifest["max_length"] for e in encodings]
    ids, lengths = pad_batch(sequences, manifest["pad_id"])
    with torch.inference_mode():
        probabilities = STATE["model"](ids, lengths).tolist()
    top_k = request.top_k or STATE["top_k"]
    return {"model": f"naive-torch-{manifest['name']}", "version": str(manifest["version"]),
            "predictions": [prediction(STATE["labels"], row, top_k, truncated)
                            for row, truncated in zip(probabilities, cut)]}


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


def main() -> None:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--model-dir", type=Path, required=True, help="an artifact version folder")
    args = args_parser.parse_args()
    STATE["top_k"] = args.default_top_k
    try:
        load(args.model_dir)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"error: cannot load {args.model_dir}: {error}")
    run(app, args.host, args.port)


if __name__ == "__main__":
    main()
