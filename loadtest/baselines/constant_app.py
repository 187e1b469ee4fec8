"""The HTTP ceilings: servers that answer a fixed prediction with no model, so they show what one core can do with
the web stack alone. Whatever the service does beyond them (tokenize, queue, run the model) costs throughput.

    python -m loadtest.baselines.constant_app --port 9000 [--model-dir models/banking77]          # H_fastapi
    python -m loadtest.baselines.constant_app --port 9000 --raw [--model-dir models/banking77]    # H_raw

- FastAPI (H_fastapi): validates the service's request body with pydantic, answers through FastAPI's routing.
- raw (H_raw): a bare ASGI callable that reads the body and writes fixed bytes, served by uvicorn exactly as
  ``python -m service`` serves (httptools, the service's own HTTP protocol, no access log): the floor of what
  any Python handler on this stack costs.
With ``--model-dir`` both answer with that model's labels, so their responses are as large as the service's.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI, Response

import contract

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


class RawApp:
    """Reads the request body, answers the same bytes every time (one prediction); /readyz answers 200."""

    def __init__(self) -> None:
        self.body = orjson.dumps({"model": "constant", "version": "0",
                                  "predictions": [_answer(SETTINGS["default_top_k"])]})
        self.headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def main() -> None:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--model-dir", type=Path, help="answer with this model's labels")
    args_parser.add_argument("--raw", action="store_true", help="a bare ASGI app on the service's uvicorn settings")
    args = args_parser.parse_args()
    SETTINGS["default_top_k"] = args.default_top_k
    if args.model_dir:
        try:
            LABELS[:] = json.loads((contract.version_folder(args.model_dir) / "labels.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, contract.ArtifactError) as error:
            sys.exit(f"error: cannot read labels: {error}")
    if not args.raw:
        run(app, args.host, args.port)
        return
    from service.http_protocol import http_protocol

    uvicorn.run(RawApp(), host=args.host, port=args.port, log_level="warning", access_log=False, server_header=False,
                http=http_protocol(10.0), lifespan="off")


if __name__ == "__main__":
    main()
