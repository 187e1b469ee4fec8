"""What both baselines share: the service's request body, its answer shape, and a uvicorn launcher."""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field, model_validator

from ..processes import Parser


class ClassifyRequest(BaseModel):
    """Same body as the service's ``POST /classify``: one ``text`` or a list of ``texts``."""

    text: str | None = Field(default=None, min_length=1)
    texts: list[str] | None = Field(default=None, min_length=1, max_length=64)
    top_k: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> "ClassifyRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


def prediction(labels: list[str], probabilities: list[float], top_k: int, truncated: bool = False) -> dict:
    """One sentence's answer, shaped like the service's: best label, its score, the top-k probabilities by label."""
    ranked = sorted(range(len(labels)), key=probabilities.__getitem__, reverse=True)[:top_k]
    return {"label": labels[ranked[0]], "score": probabilities[ranked[0]],
            "probabilities": {labels[i]: probabilities[i] for i in ranked}, "truncated": truncated}


def parser(description: str) -> argparse.ArgumentParser:
    result = Parser(description=description)
    result.add_argument("--host", default="127.0.0.1")
    result.add_argument("--port", type=int, default=8000)
    result.add_argument("--default-top-k", type=int, default=5,
                        help="classes per prediction when the request has no top_k (the service's default: 5)")
    return result


def run(app: FastAPI, host: str, port: int) -> None:
    """One uvicorn worker, no access log: the same serving stack the service uses."""
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
