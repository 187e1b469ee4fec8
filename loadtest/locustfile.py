"""Locust users for the sentence classifier service.

    locust -f loadtest/locustfile.py --headless -u 64 -r 64 -t 30s --host http://127.0.0.1:8000

Self-contained (only locust and the standard library) so it runs unchanged in the compose ``loadtest``
profile. The user sends real sentences from the dataset's test split: by default 80% of requests carry
one ``text`` and 20% carry ``texts`` with 2 to 8 sentences (mean 1.0 x 0.8 + 5 x 0.2 = 1.8 sentences per
request), with no think time, and checks the shape of every answer.

Settings (environment):
    LOCUST_HOST            the service, e.g. http://127.0.0.1:8000 (Locust's own setting, same as --host)
    LOADTEST_DATA          CSV of sentences (default: data/banking77/test.csv beside this folder)
    LOADTEST_TEXT_COLUMN   its text column (default: text)
    LOADTEST_MULTI_PERCENT share of multi-text requests, 0-100 (default: 20)
    LOADTEST_MULTI_MAX     most sentences in a multi-text request, >= 2 (default: 8)
    LOADTEST_WAIT          think time between a user's requests in seconds, "0.5" or "0.1,1.0" (default: 0)
"""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

from locust import FastHttpUser, between, constant, task

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "banking77" / "test.csv"


def _setting(name: str, default: str, parse, check, meaning: str):
    """An environment setting, or exit with one line naming it: Locust would otherwise print a traceback."""
    raw = os.environ.get(name, default)
    try:
        value = parse(raw)
        if check(value):
            return value
    except ValueError:
        pass
    sys.exit(f"error: {name}={raw!r}: expected {meaning}")


def load_sentences(path: Path, column: str) -> list[str]:
    """Non-empty values of ``column`` in the CSV at ``path``."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if column not in (reader.fieldnames or []):
                sys.exit(f"error: {path}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
            sentences = [row[column].strip() for row in reader if (row[column] or "").strip()]
    except OSError as error:
        sys.exit(f"error: LOADTEST_DATA: cannot read {path}: {error.strerror}")
    if not sentences:
        sys.exit(f"error: {path}: no sentences in column {column!r}")
    return sentences


def _wait(raw: str) -> tuple[float, float]:
    low, _, high = raw.partition(",")
    return float(low), float(high or low)


SENTENCES = load_sentences(Path(os.environ.get("LOADTEST_DATA", DEFAULT_DATA)),
                           os.environ.get("LOADTEST_TEXT_COLUMN", "text"))
MULTI_PERCENT = _setting("LOADTEST_MULTI_PERCENT", "20", int, lambda v: 0 <= v <= 100, "an integer 0-100")
MULTI_MAX = _setting("LOADTEST_MULTI_MAX", "8", int, lambda v: v >= 2, "an integer >= 2")
WAIT = _setting("LOADTEST_WAIT", "0", _wait, lambda v: 0 <= v[0] <= v[1], "seconds: '0.5' or '0.1,1.0'")


def check_answer(status: int, answer, expected: int) -> str | None:
    """Why an answer is wrong, or None: 200, and one well-formed prediction per sentence sent."""
    if status != 200:
        return f"HTTP {status}"
    if not isinstance(answer, dict) or not {"model", "version", "predictions"} <= answer.keys():
        return "answer lacks model, version or predictions"
    predictions = answer["predictions"]
    if not isinstance(predictions, list) or len(predictions) != expected:
        return f"expected {expected} predictions, got {len(predictions) if isinstance(predictions, list) else '?'}"
    for item in predictions:
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) or not item["label"]:
            return "a prediction has no label"
        score = item.get("score")
        if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            return f"a prediction's score is not a probability: {score!r}"
    return None


class ClassifyUser(FastHttpUser):
    """One client of ``POST /classify``: single sentences mostly, small multi-sentence requests sometimes."""

    wait_time = constant(WAIT[0]) if WAIT[0] == WAIT[1] else between(*WAIT)

    def _classify(self, texts: list[str]) -> None:
        body = {"text": texts[0]} if len(texts) == 1 else {"texts": texts}
        name = f"/classify [{len(texts)} text{'s' if len(texts) > 1 else ''}]"  # stats per request size
        with self.client.post("/classify", json=body, name=name, catch_response=True) as response:
            try:
                answer = response.json()
            except ValueError:
                answer = None
            problem = check_answer(response.status_code, answer, len(texts))
            if problem:
                response.failure(problem)
            else:
                response.success()

    @task(100 - MULTI_PERCENT)
    def one_text(self) -> None:
        self._classify([random.choice(SENTENCES)])

    @task(MULTI_PERCENT)
    def several_texts(self) -> None:
        self._classify(random.choices(SENTENCES, k=random.randint(2, MULTI_MAX)))
