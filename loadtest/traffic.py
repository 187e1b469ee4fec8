"""Traffic that records every request: closed loops (clients that wait for their answer) and open loops (requests
that start on a fixed schedule whatever the latency), over geventhttpclient (the client Locust's FastHttpUser uses).

A closed-loop client waits for an answer before it sends again, so a slow server is offered less load and its
queueing never shows ("coordinated omission"). In the open loop request ``i`` is due at ``start + i / rate``
and its latency counts from that due time, so time spent waiting for a connection or in the server's queue is
in the figure. Overload and soak runs use ``Traffic`` in process; the benchmark runs the open loop as its own
process, pinned to the load core:

    python -m loadtest.traffic --url http://127.0.0.1:8000 --rate 200 --seconds 8 --bodies bodies.tsv [--path /classify]

which prints one JSON object: offered and answered rates, p50/p90/p99 of the answered requests, errors by
kind, ``lag_ms`` (how late the generator itself started requests) and ``load_cpu`` (its CPU seconds per second).
With ``--clients N`` instead of ``--rate`` it runs a closed loop of N clients: the accelerator check's load, on a
machine where wrk (the harness's closed-loop generator, ``generators.py``) is not installed.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gevent
from gevent.pool import Group
from geventhttpclient import HTTPClient

from .processes import Parser
from .data import Body, percentile, read_bodies


@dataclass(slots=True)
class Record:
    """One request: when it was due, when its answer came, what it was."""

    due: float
    sentences: int
    done: float = 0.0
    status: str = "unfinished"  # the HTTP status, a transport error's name, "hung" or "unfinished"
    retry_after: bool = False
    body: bytes | None = None  # the answer, when the traffic keeps answers
    index: int = 0  # which of the bodies was sent


class Traffic:
    """A pool of keep-alive connections to one server; every request becomes a ``Record`` in ``records``."""

    def __init__(self, url: str, bodies: Sequence[Body], connections: int = 512, limit_s: float = 30.0,
                 path: str = "/classify", keep_answers: bool = False, headers: dict[str, str] | None = None) -> None:
        self.client = HTTPClient.from_url(url, concurrency=connections, connection_timeout=limit_s,
                                          network_timeout=limit_s)
        self.bodies, self.limit_s, self.path, self.keep_answers = bodies, limit_s, path, keep_answers
        self.headers = {"Content-Type": "application/json"} | (headers or {})
        self.records: list[Record] = []
        self._sent = 0

    def _one(self, record: Record, body: bytes, header: int) -> None:
        headers = self.headers if not header else self.headers | {
            "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header)}
        try:
            with gevent.Timeout(self.limit_s):
                response = self.client.post(self.path, body=body, headers=headers)
                answer = response.read()
                record.status = str(response.status_code)
                if self.keep_answers:
                    record.body = answer
                record.retry_after = response.get("retry-after") is not None
        except gevent.Timeout:
            record.status = "hung"
        except Exception as error:  # connection refused or reset: recorded, never raised
            record.status = type(error).__name__
        record.done = time.perf_counter()

    def _next(self, due: float) -> tuple[Record, bytes, int]:
        index = self._sent % len(self.bodies)
        count, body, header = self.bodies[index]
        self._sent += 1
        record = Record(due, count, index=index)
        self.records.append(record)
        return record, body, header

    def closed(self, clients: int, seconds: float, until: Callable[[], bool] | None = None) -> list[Record]:
        """``clients`` loops for ``seconds`` (or until ``until()`` is true), each sending its next request when the
        last is answered."""
        first, stop = len(self.records), time.perf_counter() + seconds

        def client() -> None:
            while time.perf_counter() < stop and not (until and until()):
                self._one(*self._next(time.perf_counter()))

        group = Group()
        for _ in range(clients):
            group.spawn(client)
        group.join()
        return self.records[first:]

    def open(self, rate: float, seconds: float) -> tuple[Group, float, int]:
        """Start requests at ``rate``/s for ``seconds``. Returns the group still running (join it), the worst
        start lag in seconds, and the index of the first record of this run."""
        first, group, start, lag = len(self.records), Group(), time.perf_counter(), 0.0
        for index in range(max(1, int(rate * seconds))):
            due = start + index / rate
            wait = due - time.perf_counter()
            if wait > 0:
                gevent.sleep(wait)
            else:
                lag = max(lag, -wait)
            group.spawn(self._one, *self._next(due))
        return group, lag, first

    def close(self) -> None:
        self.client.close()


def sample_rss(server, samples: list[tuple[float, int]], period: float = 0.5) -> None:
    """A greenlet body: append (time, resident bytes of ``server``'s processes) every ``period`` until killed."""
    while True:
        samples.append((time.perf_counter(), server.rss_bytes()))
        gevent.sleep(period)


def summary(records: Sequence[Record], seconds: float) -> dict:
    """Answered rates and latency (from each request's due time) over ``seconds``, and errors by kind."""
    ok = [r for r in records if r.status == "200"]
    latencies = [r.done - r.due for r in ok]
    kinds = Counter(r.status for r in records if r.status != "200")
    return {"requests": len(records), "ok": len(ok), "errors": sum(kinds.values()), "error_kinds": dict(kinds),
            "rps": len(ok) / seconds, "sentences_per_s": sum(r.sentences for r in ok) / seconds,
            "p50_ms": percentile(latencies, 50) * 1e3, "p90_ms": percentile(latencies, 90) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3}


def open_loop(url: str, bodies: Sequence[Body], rate: float, seconds: float, connections: int = 512,
              grace: float = 5.0, path: str = "/classify") -> dict:
    """Offer ``rate`` requests/s for ``seconds``; wait at most ``grace`` more for answers, then count the rest."""
    traffic = Traffic(url, bodies, connections, seconds + grace, path)
    cpu, start = time.process_time(), time.perf_counter()
    group, lag, _ = traffic.open(rate, seconds)
    group.join(timeout=max(0.0, start + seconds + grace - time.perf_counter()) + 1.0)
    group.kill(block=True, timeout=2)
    traffic.close()
    elapsed = max(seconds, min(time.perf_counter(), start + seconds + grace) - start)
    return {"offered_rps": round(rate, 2), **summary(traffic.records, elapsed), "lag_ms": lag * 1e3,
            "load_cpu": (time.process_time() - cpu) / elapsed}


def closed_loop(url: str, bodies: Sequence[Body], clients: int, seconds: float, path: str = "/classify") -> dict:
    """``clients`` closed-loop clients for ``seconds``: answered rates, latency, errors by kind, ``load_cpu``."""
    traffic = Traffic(url, bodies, clients, 30.0, path)
    cpu, start = time.process_time(), time.perf_counter()
    records = traffic.closed(clients, seconds)
    traffic.close()
    elapsed = time.perf_counter() - start
    return {"clients": clients, **summary(records, elapsed), "load_cpu": (time.process_time() - cpu) / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loadtest.traffic", description="open-loop load at a fixed rate (or, with "
                    "--clients, a closed loop where wrk cannot run)")
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, help="requests per second to start")
    rate.add_argument("--clients", type=int, help="instead of --rate: this many closed-loop clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to keep starting requests")
    parser.add_argument("--bodies", type=Path, required=True, help="request file: '<sentences>\\t<JSON>' per line")
    parser.add_argument("--connections", type=int, default=512, help="most requests in flight at once")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to wait for answers after the last start")
    parser.add_argument("--path", default="/classify", help="the route requests go to")
    args = parser.parse_args(argv)
    if (args.rate if args.clients is None else args.clients) <= 0 or args.seconds <= 0 or args.connections < 1 \
            or args.grace < 0:
        parser.error("--rate (or --clients) and --seconds must be > 0, --connections >= 1, --grace >= 0")
    try:
        bodies = read_bodies(args.bodies)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.clients is not None:
        print(json.dumps(closed_loop(args.url, bodies, args.clients, args.seconds, args.path)))
    else:
        print(json.dumps(open_loop(args.url, bodies, args.rate, args.seconds, args.connections, args.grace,
                                   args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
