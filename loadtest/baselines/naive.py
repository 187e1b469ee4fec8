"""The naive baseline: what a first deployment usually looks like, on the same model and runtime as the service.

A sync FastAPI endpoint (FastAPI's thread pool), the artifact loaded once into one onnxruntime session (one
thread), and one model run per request, padded to that request's longest text: no batching across requests.
Tokenization and padding are the contract's, so its answers equal the service's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastapi import FastAPI

import contract

from .common import ClassifyRequest, parser, prediction, run

app = FastAPI(title="naive FastAPI + onnxruntime baseline")
STATE: dict = {}


@app.post("/classify")
def classify(request: ClassifyRequest) -> dict:
    artifact: contract.Artifact = STATE["artifact"]
    manifest, texts = artifact.manifest, request.all_texts()
    ids, truncated = artifact.encoder.encode(texts)
    probabilities = artifact.session.run([contract.PROBABILITIES], contract.inputs(ids, manifest.pad_id,
                                                                                       manifest.input_names))[0].tolist()
    top_k = request.top_k or STATE["top_k"]
    return {"model": f"naive-{manifest.name}", "version": manifest.version,
            "predictions": [prediction(artifact.labels, row, top_k, cut) for row, cut in zip(probabilities, truncated)]}


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


def main() -> None:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--model-dir", type=Path, required=True, help="models/<name> or a version folder")
    args = args_parser.parse_args()
    STATE["top_k"] = args.default_top_k
    try:
        STATE["artifact"] = contract.check(contract.version_folder(args.model_dir))
    except contract.ArtifactError as error:
        sys.exit(f"error: {error}")
    run(app, args.host, args.port)


if __name__ == "__main__":
    main()
