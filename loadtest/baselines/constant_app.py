"""The HTTP ceiling: FastAPI validating the service's request and answering a fixed prediction, no model.

Whatever the service does beyond this (tokenize, queue, run the model) costs throughput; this app shows
what one core can do with the web stack alone. With ``--model-dir`` it answers with that model's labels so
its responses are as large as the service's.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import orjson
from fastapi import FastAPI, Response

from .common import ClassifyRequest, parser, prediction, run

app = FastAPI(title="constant-answer baseline")
LABELS: list[str] = ["constant"]
SETTINGS = {"default_top_k": 5}


@lru_cache(maxsize=64)
def _answer(top_k: int) -> dict:
    return prediction(LABELS, [1.0 / len(LABELS)] * len(LABELS), top_k)


@app.post("/classify")
async def classify(request: ClassifyRequest) -> Response:
    answer = _answer(request.top_k or SETTINGS["default_top_k"])
    body = {"model": "constant", "version": "0", "predictions": [answer] * len(request.all_texts())}
    return Response(orjson.dumps(body), media_type="application/json")


@app.get("/readyz")
async def readyz() -> dict:
    return {"status": "ready"}


def main() -> None:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--model-dir", type=Path, help="answer with the labels.json found here")
    args = args_parser.parse_args()
    SETTINGS["default_top_k"] = args.default_top_k
    if args.model_dir:
        try:
            LABELS[:] = json.loads((args.model_dir / "labels.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            sys.exit(f"error: cannot read labels: {error}")
    run(app, args.host, args.port)


if __name__ == "__main__":
    main()
