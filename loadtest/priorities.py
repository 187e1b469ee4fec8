"""The priority overload run of the benchmark (``python -m loadtest.bench --priority-overload``): a fresh service with
priorities on (the defaults: 3 levels, requests without ``priority`` at level 2) and one with them off
(``SCS_PRIORITY_LEVELS=1``), each in turn: capacity by a closed loop, then ``factor`` x that open loop for
``seconds``, the same bodies to both: 8-sentence requests, ``high_share`` of them ``"priority": 1`` (the rest give no
priority). Each class's answered rate, p50/p99 (from each request's due time, so queueing counts) and 503s, and the
total answered rate; the response cache is off in both (the overload is the model's, not the cache's).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .data import Body, percentile, read_sentences
from .modes import start_service
from .traffic import Traffic

CLASSES = ("high", "low")


def priority_bodies(sentences: list[str], high_share: float, texts: int = 8, count: int = 2000,
                    seed: int = 0) -> tuple[list[Body], list[str]]:
    """``count`` bodies of ``texts`` sentences; each body's class (``high``: ``"priority": 1``; ``low``: none)."""
    rng, bodies, classes = random.Random(seed), [], []
    for _ in range(count):
        high = rng.random() < high_share
        body = {"texts": rng.choices(sentences, k=texts)} | ({"priority": 1} if high else {})
        bodies.append((texts, json.dumps(body).encode(), 0))
        classes.append("high" if high else "low")
    return bodies, classes


def one_run(url: str, bodies: list[Body], classes: list[str], factor: float, seconds: float,
            capacity_seconds: float, clients: int = 64) -> dict:
    traffic = Traffic(url, bodies, connections=4000, limit_s=20.0)
    traffic.closed(clients, 2.0)  # warm-up
    capacity_records = traffic.closed(clients, capacity_seconds)
    capacity = sum(r.status == "200" for r in capacity_records) / capacity_seconds
    group, lag, first = traffic.open(factor * capacity, seconds)
    group.join(timeout=30)
    traffic.close()
    over = traffic.records[first:]
    levels = {}
    for name in CLASSES:
        mine = [r for r in over if classes[r.index] == name]
        ok = [r.done - r.due for r in mine if r.status == "200"]
        levels[name] = {"requests": len(mine), "answered_rps": len(ok) / seconds,
                        "rejected": sum(r.status == "503" for r in mine),
                        "other_errors": sum(r.status not in ("200", "503") for r in mine),
                        "p50_ms": percentile(ok, 50) * 1e3, "p99_ms": percentile(ok, 99) * 1e3}
    answered = sum(r.status == "200" for r in over)
    return {"capacity_rps": capacity, "offered_rps": factor * capacity, "lag_ms": lag * 1e3,
            "answered_rps": answered / seconds, "levels": levels}


def priority_overload(model_dir: Path, data: Path, log_dir: Path, factor: float = 3.0, seconds: float = 20.0,
                      capacity_seconds: float = 8.0, high_share: float = 0.1, say=print) -> dict:
    """Both runs (priorities on, then off) and how they were set up."""
    bodies, classes = priority_bodies(read_sentences(data), high_share)
    runs = {}
    for name, env in (("on", {}), ("off", {"SCS_PRIORITY_LEVELS": "1", "SCS_DEFAULT_PRIORITY": "1"})):
        server = start_service("multi", model_dir, log_dir / f"priorities-{name}.log",
                               {"SCS_INTRA_OP_THREADS": "1"} | env)
        try:
            runs[name] = one_run(server.url, bodies, classes, factor, seconds, capacity_seconds)
        finally:
            server.stop()
        run = runs[name]
        say(f"priorities {name}: capacity {run['capacity_rps']:.0f} req/s, offered {run['offered_rps']:.0f}, answered "
            f"{run['answered_rps']:.0f} (lag {run['lag_ms']:.0f} ms); " + "; ".join(
                f"{level} p50 {row['p50_ms']:.0f} p99 {row['p99_ms']:.0f} ms, {row['answered_rps']:.0f} req/s, "
                f"{row['rejected']} x 503" for level, row in run["levels"].items()))
    return {"factor": factor, "seconds": seconds, "high_share": high_share, "texts_per_request": 8, "runs": runs}
