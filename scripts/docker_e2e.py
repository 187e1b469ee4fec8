"""End-to-end checks of the containerised service through its published port (run by scripts/ci_docker.sh).

    python scripts/docker_e2e.py classify --url http://127.0.0.1:8000 --model-dir models/banking77
    python scripts/docker_e2e.py drain --url http://127.0.0.1:8000 --stop-command "docker compose stop classifier"

``classify`` sends the whole test split and requires the container's accuracy to equal the one the manifest
recorded at export (same model, same tokenizer, so the same answers), every label to be one of labels.json.
``drain`` keeps concurrent clients busy, runs the stop command, and requires every request to get 200
(well-formed) or a clean 503, or to be refused at connect; a request the server accepted and then dropped is a
failure. As behind a load balancer, clients stop sending once /readyz turns 503 (polled every 0.1 s), so the
service's drain window (SCS_DRAIN_SECONDS: still serving, readiness 503) must outlast a poll and a request.
Each prints what it measured; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx

import contract

CHUNK = 32  # sentences per request in `classify` (the service's default max_texts is 64)
READY_POLL_S = 0.1  # how often `drain`'s stand-in load balancer polls /readyz


def read_split(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [(row[text_column], row[label_column]) for row in csv.DictReader(handle)]


def check_classify(args: argparse.Namespace) -> list[str]:
    try:
        artifact = contract.read(contract.version_folder(args.model_dir))
    except contract.ArtifactError as error:
        return [f"the model the image was built from: {error}"]
    manifest, labels = artifact.manifest, set(artifact.labels)
    rows = read_split(args.data, manifest.dataset.get("text_column", "text"),
                      manifest.dataset.get("label_column", "category"))
    problems: list[str] = []
    correct = 0
    started = time.perf_counter()
    with httpx.Client(base_url=args.url, timeout=30) as client:
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            response = client.post("/classify", json={"texts": [text for text, _ in chunk], "top_k": 1})
            if response.status_code != 200:
                return [f"POST /classify: HTTP {response.status_code}: {response.text[:200]}"]
            answer = response.json()
            if (answer["model"], str(answer["version"])) != (manifest.name, manifest.version):
                return [f"served {answer['model']}/{answer['version']}, expected {manifest.name}/{manifest.version}"]
            predictions = answer["predictions"]
            if len(predictions) != len(chunk):
                return [f"{len(chunk)} texts sent, {len(predictions)} predictions back"]
            for (_, gold), prediction in zip(chunk, predictions):
                if prediction["label"] not in labels:
                    problems.append(f"label {prediction['label']!r} is not in labels.json")
                correct += prediction["label"] == gold
    seconds = time.perf_counter() - started
    accuracy = correct / len(rows)
    recorded = manifest.metrics["accuracy"]
    print(f"classify: {len(rows)} sentences in {seconds:.1f} s; accuracy {accuracy:.4f}, "
          f"manifest says {recorded:.4f}; chance is {1 / len(labels):.4f}")
    if manifest.metrics.get("test_rows", len(rows)) == len(rows) and abs(accuracy - recorded) > args.tolerance:
        problems.append(f"accuracy {accuracy:.4f} differs from the manifest's {recorded:.4f} by more than {args.tolerance}")
    if accuracy < args.min_accuracy:
        problems.append(f"accuracy {accuracy:.4f} is below --min-accuracy {args.min_accuracy}")
    return problems[:10]


def readiness_monitor(url: str, removed: threading.Event, stop: threading.Event, seen: list[str]) -> None:
    """What a load balancer does: poll /readyz and take the instance out of rotation once it is not ready."""
    while not stop.is_set():
        try:
            status = httpx.get(f"{url}/readyz", timeout=2).status_code
        except httpx.HTTPError as error:
            status = type(error).__name__
        if status != 200:
            seen.append(str(status))
            removed.set()
            return
        time.sleep(READY_POLL_S)


def worker(url: str, sentences: list[str], index: int, removed: threading.Event, outcomes: list) -> None:
    """One client, a fresh connection per request (so each outcome is one request's fate). It sends until
    the instance is out of rotation, or answers 503, or refuses a connection."""
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30, connect=5),
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        n = index
        while not removed.is_set():
            n += 1
            began = time.time()
            try:
                response = client.post("/classify", json={"text": sentences[n % len(sentences)]})
                kind, detail = classify_answer(response), None
            except (httpx.ConnectError, httpx.ConnectTimeout):
                kind, detail = "refused", None
            except httpx.HTTPError as error:
                kind, detail = "dropped", f"{type(error).__name__}: {error}"
            outcomes.append((began, time.time(), kind, detail))
            if kind.startswith("503") or kind == "refused":
                return


def classify_answer(response: httpx.Response) -> str:
    """200 with one prediction, a clean 503 (JSON error, Retry-After), or 'bad'."""
    try:
        body = response.json()
    except ValueError:
        return f"bad: HTTP {response.status_code}, body is not JSON"
    if response.status_code == 200 and len(body.get("predictions", [])) == 1:
        return "200"
    if response.status_code == 503 and "error" in body and "retry-after" in response.headers:
        return f"503 {body['error'].get('code')}"
    return f"bad: HTTP {response.status_code} {str(body)[:120]}"


def sigterm_time(log_command: list[str]) -> float | None:
    """When the service last logged that it began draining (its JSON log line), as a Unix time."""
    if not log_command:
        return None
    lines = subprocess.run(log_command, capture_output=True, text=True).stdout.splitlines()
    for line in reversed(lines):
        try:
            entry = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if entry.get("message") == "draining":
            return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
    return None


def check_drain(args: argparse.Namespace) -> list[str]:
    sentences = [text for text, _ in read_split(args.data, "text", "category")]
    outcomes: list[tuple[float, float, str, str | None]] = []
    removed, stop = threading.Event(), threading.Event()
    seen: list[str] = []
    monitor = threading.Thread(target=readiness_monitor, args=(args.url, removed, stop, seen))
    threads = [threading.Thread(target=worker, args=(args.url, sentences, i * 997, removed, outcomes))
               for i in range(args.clients)]
    for thread in [monitor, *threads]:
        thread.start()
    time.sleep(args.warm_seconds)
    stop_at = time.time()
    result = subprocess.run(args.stop_command, capture_output=True, text=True)
    stopped_after = time.time() - stop_at
    stop.set()
    removed.set()
    for thread in [monitor, *threads]:
        thread.join()
    if result.returncode != 0:
        return [f"stop command failed ({result.returncode}): {result.stderr.strip()[:300]}"]
    try:
        httpx.post(f"{args.url}/classify", json={"text": sentences[0]}, timeout=5)
        gone = False
    except (httpx.ConnectError, httpx.ConnectTimeout):
        gone = True

    before = Counter(kind for began, _, kind, _ in outcomes if began < stop_at)
    after = Counter(kind for began, _, kind, _ in outcomes if began >= stop_at)
    print(f"drain: {args.clients} clients; before stop {dict(before)}; after stop began {dict(after)}; "
          f"stop took {stopped_after:.1f} s")
    signalled = sigterm_time(args.log_command)
    if signalled is not None:
        across = sum(1 for began, ended, kind, _ in outcomes if began < signalled < ended and kind == "200")
        print(f"drain: {across} requests were in flight when SIGTERM came and were answered 200")
    problems = [f"{kind} {detail or ''}".strip() for _, _, kind, detail in outcomes
                if kind == "dropped" or kind.startswith("bad")]
    if before["refused"]:
        problems.append(f"{before['refused']} connections refused before the stop began")
    if before["200"] == 0:
        problems.append("no request succeeded before the stop: nothing was under load")
    if seen != ["503"]:
        problems.append(f"/readyz never answered 503 between SIGTERM and exit (saw {seen or 'nothing'})")
    if not gone:
        problems.append("the service still answers after the stop command returned")
    return problems[:10]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["classify", "drain"])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", type=Path, default=Path("data/banking77/test.csv"))
    parser.add_argument("--model-dir", type=Path, default=Path("models/banking77"))
    parser.add_argument("--tolerance", type=float, default=0.002,
                        help="largest accuracy difference from the manifest (ties between near-equal classes)")
    parser.add_argument("--min-accuracy", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warm-seconds", type=float, default=1.5, help="load before the stop command")
    parser.add_argument("--log-command", type=shlex.split, default=[],
                        help="(drain) prints the service's log, to find when SIGTERM came")
    parser.add_argument("--stop-command", type=shlex.split, default=[], help="(drain) stops the service")
    args = parser.parse_args(argv)
    if args.check == "drain" and not args.stop_command:
        parser.error("drain needs --stop-command")
    problems = check_classify(args) if args.check == "classify" else check_drain(args)
    for problem in problems:
        print(f"FAIL {args.check}: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
