"""Open-loop load: requests start on a fixed schedule (a constant arrival rate), whatever the server's latency.

A closed-loop client waits for an answer before it sends again, so a slow server is offered less load and
its queueing never shows ("coordinated omission"). Here request ``i`` is due at ``start + i / rate`` and its
latency counts from that due time, so time spent waiting for a free connection or in the server's queue is
in the figure. The HTTP client is geventhttpclient (the one Locust's FastHttpUser uses).

    python -m loadtest.openloop --url http://127.0.0.1:8000 --rate 200 --seconds 8 --bodies bodies.tsv

``bodies.tsv`` is the harness's request file: "<number of sentences>\\t<JSON body>" per line. Prints one JSON
object: offered and achieved rates, p50/p90/p99 latency of the answered requests, errors, ``lag_ms`` (how
late the generator itself started requests) and ``load_cpu`` (its CPU seconds per second): large values of
either mean the generator, not the server, fell behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gevent
from gevent.pool import Group
from geventhttpclient import HTTPClient


def read_bodies(path: Path) -> list[tuple[int, bytes]]:
    """(sentences, body) pairs from the harness's tab-separated request file."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        count, _, body = line.partition("\t")
        if body:
            pairs.append((int(count), body.encode()))
    if not pairs:
        raise ValueError(f"{path}: no request bodies")
    return pairs


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..100) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share / 100 * len(ordered) + 0.5) - 1))]


def run(url: str, bodies: list[tuple[int, bytes]], rate: float, seconds: float, connections: int = 512,
        grace: float = 5.0, path: str = "/classify") -> dict:
    """Offer ``rate`` requests/s for ``seconds``; wait at most ``grace`` more for answers, then stop."""
    client = HTTPClient.from_url(url, concurrency=connections, connection_timeout=seconds + grace,
                                 network_timeout=seconds + grace)
    latencies: list[float] = []
    tally = {"ok": 0, "sentences": 0, "errors": 0, "status": {}}
    total = max(1, int(rate * seconds))
    cpu_start = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds + grace
    lag = 0.0

    def one(due: float, count: int, body: bytes) -> None:
        try:
            with gevent.Timeout(max(0.001, deadline - time.perf_counter())):
                response = client.post(path, body=body, headers={"Content-Type": "application/json"})
                response.read()
                status = response.status_code
        except BaseException as error:  # gevent.Timeout is a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit, gevent.GreenletExit)):
                raise
            status = type(error).__name__
        if status == 200:
            latencies.append(time.perf_counter() - due)
            tally["ok"] += 1
            tally["sentences"] += count
        else:
            tally["errors"] += 1
            tally["status"][str(status)] = tally["status"].get(str(status), 0) + 1

    group = Group()
    for index in range(total):
        due = start + index / rate
        wait = due - time.perf_counter()
        if wait > 0:
            gevent.sleep(wait)
        else:
            lag = max(lag, -wait)
        group.spawn(one, due, *bodies[index % len(bodies)])
    group.join(timeout=max(0.0, deadline - time.perf_counter()) + 1.0)  # each request times out at the deadline
    group.kill(block=True, timeout=2)
    client.close()
    unfinished = total - tally["ok"] - tally["errors"]
    if unfinished:
        tally["errors"] += unfinished
        tally["status"]["unfinished"] = unfinished
    elapsed = max(seconds, min(time.perf_counter(), deadline) - start)
    return {
        "offered_rps": round(rate, 2), "requests": total, "ok": tally["ok"], "errors": tally["errors"],
        "error_kinds": tally["status"], "rps": tally["ok"] / elapsed, "sentences_per_s": tally["sentences"] / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3, "p90_ms": percentile(latencies, 90) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3, "lag_ms": lag * 1e3,
        "load_cpu": (time.process_time() - cpu_start) / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.openloop", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--rate", type=float, required=True, help="requests per second to start")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to keep starting requests")
    parser.add_argument("--bodies", type=Path, required=True, help="request file: '<sentences>\\t<JSON>' per line")
    parser.add_argument("--connections", type=int, default=512, help="most requests in flight at once")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to wait for answers after the last start")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.connections < 1 or args.grace < 0:
        parser.error("--rate and --seconds must be > 0, --connections >= 1, --grace >= 0")
    try:
        bodies = read_bodies(args.bodies)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(run(args.url, bodies, args.rate, args.seconds, args.connections, args.grace)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
