"""Overload check: measure capacity, offer 3x that for 60 s open loop, then check that the service recovers.

    python scripts/overload.py [--model-dir models/banking77] [--factor 3] [--seconds 60]

Starts ``python -m service`` on 127.0.0.1 pinned to core 0 (this generator runs on core 1), then:
1. capacity: closed loop (``--clients`` clients, each waiting for its answer) for ``--capacity-seconds``;
2. overload: requests start on a fixed schedule at ``factor`` x capacity (open loop, so a slow server is
   not offered less), each with a client-side limit of request_timeout + 5 s: one that passes it is "hung";
3. recovery: the schedule stops and the closed loop starts again; the time until a 1 s window answers
   >= 90% of capacity is the recovery time (answers to leftover overload requests count: they are work done).
Resident memory of the server is sampled from /proc every 0.25 s. Prints a table and one JSON line; exits 1
when a bar fails: a hung request, a 5xx, a 503 without Retry-After, an answer later than the request
timeout, or recovery slower than 5 s. The HTTP client is geventhttpclient (the one Locust's FastHttpUser uses).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gevent
from gevent.pool import Group
from geventhttpclient import HTTPClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.processes import Server, free_port, stop_all  # noqa: E402


def sentences(count: int) -> list[str]:
    with (ROOT / "data" / "banking77" / "test.csv").open(encoding="utf-8") as handle:
        return [row["text"] for row, _ in zip(csv.DictReader(handle), range(count))]


def bodies(texts_per_request: int, count: int = 200) -> list[bytes]:
    pool = sentences(count * texts_per_request)
    return [json.dumps({"texts": pool[i * texts_per_request:(i + 1) * texts_per_request]}).encode()
            for i in range(count)]


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Record:
    """One request: when it was due, when its answer came, what it was."""

    due: float
    done: float = 0.0
    status: str = "unfinished"
    retry_after: bool = False


@dataclass
class Tally:
    records: list[Record] = field(default_factory=list)

    def by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts


class Load:
    """A geventhttpclient pool against one server; every request is recorded."""

    def __init__(self, url: str, payloads: list[bytes], connections: int, limit_s: float) -> None:
        self.client = HTTPClient.from_url(url, concurrency=connections, connection_timeout=limit_s,
                                          network_timeout=limit_s)
        self.payloads = payloads
        self.limit_s = limit_s
        self.sent = 0

    def one(self, record: Record) -> None:
        body = self.payloads[self.sent % len(self.payloads)]
        self.sent += 1
        try:
            with gevent.Timeout(self.limit_s):
                response = self.client.post("/classify", body=body, headers={"Content-Type": "application/json"})
                response.read()
                record.status = str(response.status_code)
                record.retry_after = response.get("retry-after") is not None
        except gevent.Timeout:
            record.status = "hung"
        except Exception as error:  # connection refused/reset: recorded, never raised
            record.status = type(error).__name__
        record.done = time.perf_counter()

    def closed(self, clients: int, seconds: float, tally: Tally) -> None:
        """``clients`` loops, each sending its next request when the last is answered."""
        stop = time.perf_counter() + seconds

        def client() -> None:
            while time.perf_counter() < stop:
                record = Record(time.perf_counter())
                tally.records.append(record)
                self.one(record)

        group = Group()
        for _ in range(clients):
            group.spawn(client)
        group.join()

    def open(self, rate: float, seconds: float, tally: Tally) -> tuple[Group, float]:
        """Start requests at ``rate``/s for ``seconds``; returns the running group and the worst start lag."""
        group, start, lag = Group(), time.perf_counter(), 0.0
        for index in range(int(rate * seconds)):
            due = start + index / rate
            wait = due - time.perf_counter()
            if wait > 0:
                gevent.sleep(wait)
            else:
                lag = max(lag, -wait)
            record = Record(due)
            tally.records.append(record)
            group.spawn(self.one, record)
        return group, lag


def sample_rss(pid: int, samples: list[tuple[float, int]], period: float = 0.25) -> None:
    while True:
        samples.append((time.perf_counter(), rss_kib(pid)))
        gevent.sleep(period)


def answered_per_window(records: list[Record], start: float, end: float, window: float = 1.0,
                        step: float = 0.25) -> list[tuple[float, int]]:
    """(offset from ``start``, 200 answers in [t, t + window)) for t stepping through [start, end - window]."""
    done = sorted(r.done for r in records if r.status == "200" and start <= r.done < end)
    windows, t = [], start
    while t + window <= end + 1e-9:
        windows.append((t - start, sum(1 for d in done if t <= d < t + window)))
        t += step
    return windows


def start_server(args, port: int) -> Server:
    env = {f"SCS_{k.upper()}": str(v) for k, v in (item.split("=", 1) for item in args.env)}
    env |= {"SCS_LOG_LEVEL": "warning", "SCS_REQUEST_TIMEOUT_S": str(args.request_timeout)}
    server = Server("service", [sys.executable, "-m", "service", "--model-dir", str(args.model_dir),
                                "--host", "127.0.0.1", "--port", str(port)], port, env)
    server.start(core=0, log=args.log)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77")
    parser.add_argument("--texts", type=int, default=8, help="sentences per request")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients (capacity, recovery)")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of capacity")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the overload lasts")
    parser.add_argument("--recovery-seconds", type=float, default=10.0)
    parser.add_argument("--request-timeout", type=float, default=10.0, help="the server's SCS_REQUEST_TIMEOUT_S")
    parser.add_argument("--connections", type=int, default=4000, help="most requests in flight from this client")
    parser.add_argument("--env", action="append", default=[], help="server setting KEY=VALUE (SCS_ prefix added)")
    parser.add_argument("--log", type=Path, default=Path("/tmp/overload-service.log"))
    args = parser.parse_args(argv)
    if args.texts < 1 or args.factor <= 0 or args.seconds <= 0 or args.capacity_seconds <= 0:
        parser.error("--texts, --factor, --seconds and --capacity-seconds must be positive")
    return with_server(args, run)


def with_server(args, check) -> int:
    """Start the service (core 0), run ``check(args, server)`` from core 1, always stop the service."""
    try:
        os.sched_setaffinity(0, {1})
    except (AttributeError, OSError):
        pass
    args.log.write_text("")
    server = start_server(args, free_port())
    try:
        return check(args, server)
    finally:
        server.stop()
        stop_all()


def run(args, server: Server) -> int:
    pid = server.process.pid
    limit = args.request_timeout + 5.0
    load = Load(server.url, bodies(args.texts), args.connections, limit)
    load.closed(args.clients, 3.0, Tally())  # warm-up
    idle_rss = rss_kib(pid)
    rss: list[tuple[float, int]] = []
    sampler = gevent.spawn(sample_rss, pid, rss)

    capacity_tally = Tally()
    started = time.perf_counter()
    load.closed(args.clients, args.capacity_seconds, capacity_tally)
    capacity = capacity_tally.by_status().get("200", 0) / (time.perf_counter() - started)
    print(f"capacity: {capacity:.1f} req/s ({capacity * args.texts:.0f} sentences/s), {args.clients} clients",
          flush=True)

    rate = args.factor * capacity
    over = Tally()
    over_start = time.perf_counter()
    group, lag = load.open(rate, args.seconds, over)
    dropped = time.perf_counter()
    rss_over = [kib for t, kib in rss if over_start <= t <= dropped]
    recovery = Tally()
    load.closed(args.clients, args.recovery_seconds, recovery)
    group.join(timeout=limit + 1)
    sampler.kill()
    after_rss = rss_kib(pid)

    over_records = over.records
    statuses = over.by_status()
    late = [r for r in over_records if r.status in ("200", "503") and r.done - r.due > args.request_timeout]
    latencies = sorted(r.done - r.due for r in over_records if r.status == "200")
    refusals = [r for r in over_records if r.status == "503"]
    refusal_latency = sorted(r.done - r.due for r in refusals)
    windows = answered_per_window(over_records + recovery.records, dropped, dropped + args.recovery_seconds)
    recovered_at = next((t + 1.0 for t, n in windows if n >= 0.9 * capacity), None)
    steady = max((n for t, n in windows[-4:]), default=0)

    def pct(values: list[float], share: float) -> str:
        return f"{values[min(len(values) - 1, int(share * len(values)))] * 1000:,.0f}" if values else "-"

    rows = [
        ("capacity (closed loop)", f"{capacity:,.1f} req/s = {capacity * args.texts:,.0f} sentences/s"),
        (f"offered ({args.factor:g}x, open loop)", f"{rate:,.1f} req/s for {args.seconds:g} s = {len(over_records):,} "
                                                   f"requests (generator lag max {lag * 1000:,.0f} ms)"),
        ("answers by status", ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items()))),
        ("answered 200", f"{statuses.get('200', 0) / args.seconds:,.1f} req/s; latency p50 {pct(latencies, .5)} ms, "
                         f"p99 {pct(latencies, .99)} ms, max {pct(latencies, 1.0)} ms"),
        ("refused 503", f"{len(refusals):,}, all with Retry-After: {all(r.retry_after for r in refusals)}; "
                        f"latency p50 {pct(refusal_latency, .5)} ms, max {pct(refusal_latency, 1.0)} ms"),
        ("hung (> timeout + 5 s) / later than timeout", f"{statuses.get('hung', 0)} / {len(late)}"),
        ("server RSS idle / peak under overload / after",
         f"{idle_rss / 1024:,.1f} / {max(rss_over, default=0) / 1024:,.1f} / {after_rss / 1024:,.1f} MiB"),
        ("recovery: first 1 s window >= 90% capacity", "not within the recovery run" if recovered_at is None
         else f"{recovered_at:.2f} s after the load dropped"),
        ("recovered throughput (best of last 1 s windows)", f"{steady:,} req/s = {steady / capacity:.0%} of capacity"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n| {'overload check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")

    failures = []
    if statuses.get("hung"):
        failures.append(f"{statuses['hung']} hung requests")
    server_errors = {k: v for k, v in statuses.items() if k.startswith("5") and k != "503"}
    if server_errors:
        failures.append(f"5xx other than 503: {server_errors}")
    others = {k: v for k, v in statuses.items() if not k.isdigit()}
    if others:
        failures.append(f"transport errors: {others}")
    if not all(r.retry_after for r in refusals):
        failures.append("a 503 without Retry-After")
    if late:
        failures.append(f"{len(late)} answers later than the request timeout")
    if recovered_at is None or recovered_at > 5.0:
        failures.append(f"recovery to 90% took {recovered_at} s (bar: 5 s)")
    print(json.dumps({"capacity_rps": capacity, "texts_per_request": args.texts, "offered_rps": rate,
                      "statuses": statuses, "late": len(late), "idle_rss_kib": idle_rss,
                      "peak_rss_kib": max(rss_over, default=0), "after_rss_kib": after_rss,
                      "recovered_s": recovered_at, "failures": failures}))
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
