"""Load generators the harness drives, each a separate process pinned to the load core.

- closed loop, ``wrk`` (C, one thread: several times Locust's rate on one core, measured in BENCHMARKS.md)
  with ``loadtest/wrk/classify.lua``;
- closed loop, Locust headless (the fallback where wrk is missing, and the generator check);
- open loop, ``loadtest/openloop.py`` (fixed arrival rate, latency from each request's due time).

Each returns one row: requests/s, sentences/s, p50/p90/p99 in ms, errors, and ``load_cpu`` (the generator's
CPU seconds per second it ran, start-up included: near 1.0 means the generator itself was the bottleneck).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .processes import finish, spawn

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk" / "classify.lua"
LOCUSTFILE = HERE / "locustfile.py"
WRK = shutil.which("wrk")
LOCUST = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))


def write_bodies(sentences: list[str], path: Path, multi_percent: int = 20, multi_max: int = 8,
                 count: int = 4000, seed: int = 0) -> float:
    """The request mix of the Locust user (by default 80% one text, 20% 2-8 texts), as a file; mean sentences."""
    rng = random.Random(seed)
    total = 0
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            if rng.randrange(100) < multi_percent:
                texts = rng.choices(sentences, k=rng.randint(2, multi_max))
                body = {"texts": texts}
            else:
                texts = [rng.choice(sentences)]
                body = {"text": texts[0]}
            total += len(texts)
            handle.write(f"{len(texts)}\t{json.dumps(body, ensure_ascii=False)}\n")
    return total / count


def wrk(url: str, connections: int, seconds: float, bodies: Path, core: int | None) -> dict:
    argv = [WRK, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "--latency",
            "-s", str(WRK_SCRIPT), url, "--", str(bodies)]
    code, output, cpu = finish(spawn(argv, core, capture=True), timeout=seconds + 40)
    found = re.search(r"^WRK_JSON (\{.*\})$", output, re.MULTILINE)
    if code != 0 or not found:
        raise RuntimeError(f"wrk failed (exit {code}): {output.strip()[-300:]}")
    raw = json.loads(found.group(1))
    duration = raw["duration_s"]
    per_request = raw["sent_sentences"] / raw["sent"] if raw["sent"] else 0.0
    errors = sum(value for key, value in raw.items() if key.startswith("errors_"))
    ok = raw["requests"] - raw["errors_status"]
    return {"requests": raw["requests"], "errors": errors, "rps": ok / duration,
            "sentences_per_s": ok * per_request / duration, "p50_ms": raw["p50_ms"], "p90_ms": raw["p90_ms"],
            "p99_ms": raw["p99_ms"], "load_cpu": cpu}


def locust(url: str, users: int, seconds: float, bodies_mix: tuple[int, int], data: Path, core: int | None) -> dict:
    """Locust headless with ``ClassifyUser``: the same request mix, read from ``data``.

    Figures come from Locust's final JSON stats (its CSV can miss the last second): the per-request-size
    entries' response-time histograms are merged, so percentiles have Locust's rounding (1 ms below 100 ms).
    """
    multi_percent, multi_max = bodies_mix
    with tempfile.TemporaryDirectory(prefix="bench-locust-") as folder:
        stats_path = Path(folder) / "stats"
        argv = [LOCUST, "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
                "-t", f"{max(1, round(seconds))}s", "--host", url, "--only-summary", "--json-file", str(stats_path),
                "--stop-timeout", "5", "--loglevel", "WARNING"]
        env = {"LOADTEST_DATA": str(data), "LOADTEST_MULTI_PERCENT": str(multi_percent),
               "LOADTEST_MULTI_MAX": str(multi_max), "LOADTEST_WAIT": "0"}
        code, output, cpu = finish(spawn(argv, core, env=env, capture=True), timeout=seconds + 40)
        try:
            entries = json.loads(stats_path.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise RuntimeError(f"locust failed (exit {code}): {output.strip()[-300:]}") from None
    requests = sum(e["num_requests"] for e in entries)
    if not requests:
        raise RuntimeError(f"locust sent no request in {seconds:g}s (exit {code}): {output.strip()[-300:]}")
    failures = sum(e["num_failures"] for e in entries)
    elapsed = max(e["last_request_timestamp"] for e in entries) - min(e["start_time"] for e in entries)
    sentences = 0
    histogram: dict[float, int] = {}
    for entry in entries:
        size = re.search(r"\[(\d+) texts?\]", entry["name"])
        sentences += int(size.group(1)) * (entry["num_requests"] - entry["num_failures"]) if size else 0
        for millis, count in entry["response_times"].items():
            histogram[float(millis)] = histogram.get(float(millis), 0) + count
    return {"requests": requests, "errors": failures, "rps": (requests - failures) / elapsed,
            "sentences_per_s": sentences / elapsed, "p50_ms": _histogram_percentile(histogram, 50),
            "p90_ms": _histogram_percentile(histogram, 90), "p99_ms": _histogram_percentile(histogram, 99),
            "load_cpu": cpu}


def _histogram_percentile(histogram: dict[float, int], share: float) -> float:
    """Nearest-rank percentile of a {value: count} histogram."""
    rank, seen = share / 100 * sum(histogram.values()), 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


def open_loop(url: str, rate: float, seconds: float, bodies: Path, core: int | None, grace: float = 5.0) -> dict:
    argv = [sys.executable, "-m", "loadtest.openloop", "--url", url, "--rate", f"{rate:.3f}",
            "--seconds", f"{seconds:g}", "--bodies", str(bodies), "--grace", f"{grace:g}"]
    code, output, _ = finish(spawn(argv, core, capture=True, cwd=HERE.parent), timeout=seconds + grace + 30)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"open loop failed (exit {code}): {output.strip()[-300:]}")
    return json.loads(lines[-1])  # its own load_cpu: measured over the run, not the interpreter's start
