"""Overload: measure capacity, offer a multiple of it open loop, then check that the service recovers.

    python -m loadtest.overload [--mode multi] [--factor 3] [--seconds 60]      # what `make overload` runs

Starts ``python -m service`` in ``--mode`` (``loadtest.modes``) on 127.0.0.1 pinned to core 0 (this generator
runs on core 1), then:
1. capacity: ``--clients`` closed-loop clients for ``--capacity-seconds``;
2. overload: requests start on a fixed schedule at ``factor`` x capacity (open loop, so a slow server is not
   offered less), each with a client-side limit of the request timeout + 5 s: one that passes it is "hung";
3. recovery: the schedule stops and the closed loop starts again; the time until a 1 s window answers
   >= 90% of capacity is the recovery time (answers to leftover overload requests count: they are work done).
Resident memory of the server is read every 0.25 s. Prints a table and one JSON line; exits 1 when a bar fails: a
hung request, a 5xx other than 503, a 503 without Retry-After, an answer later than the request timeout, a
transport error, or recovery slower than 5 s.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gevent

from .data import percentile
from .modes import MODES, ROOT, bodies, start_service
from .processes import Parser, guarded, on_the_load_core, verdict
from .traffic import Record, Traffic, sample_rss


def answered_per_window(records: list[Record], start: float, end: float, window: float = 1.0,
                        step: float = 0.25) -> list[tuple[float, int]]:
    """(offset from ``start``, 200 answers in [t, t + window)) for t stepping through [start, end - window]."""
    done = sorted(r.done for r in records if r.status == "200" and start <= r.done < end)
    windows, t = [], start
    while t + window <= end + 1e-9:
        windows.append((t - start, sum(1 for d in done if t <= d < t + window)))
        t += step
    return windows


def overload(args, server) -> tuple[list[tuple[str, str]], dict, list[str]]:
    limit = args.request_timeout + 5.0
    traffic = Traffic(server.url, bodies(args.mode, args.data), args.connections, limit)
    traffic.closed(args.clients, 3.0)  # warm-up
    idle_rss = server.rss_bytes()
    rss: list[tuple[float, int]] = []
    sampler = gevent.spawn(sample_rss, server, rss, 0.25)

    started = time.perf_counter()
    capacity_records = traffic.closed(args.clients, args.capacity_seconds)
    capacity = sum(r.status == "200" for r in capacity_records) / (time.perf_counter() - started)
    texts = MODES[args.mode][1]
    print(f"capacity: {capacity:.1f} req/s ({capacity * texts:.0f} sentences/s), {args.clients} clients", flush=True)

    rate = args.factor * capacity
    over_start = time.perf_counter()
    group, lag, first = traffic.open(rate, args.seconds)
    dropped = time.perf_counter()
    over = traffic.records[first:]
    rss_over = [size for t, size in rss if over_start <= t <= dropped]
    recovery = traffic.closed(args.clients, args.recovery_seconds)
    group.join(timeout=limit + 1)
    sampler.kill()
    traffic.close()
    after_rss = server.rss_bytes()

    statuses = Counter(r.status for r in over)
    late = [r for r in over if r.status in ("200", "503") and r.done - r.due > args.request_timeout]
    latencies = [r.done - r.due for r in over if r.status == "200"]
    refusals = [r for r in over if r.status == "503"]
    refusal_latency = [r.done - r.due for r in refusals]
    windows = answered_per_window(over + recovery, dropped, dropped + args.recovery_seconds)
    recovered_at = next((t + 1.0 for t, n in windows if n >= 0.9 * capacity), None)
    steady = max((n for _, n in windows[-4:]), default=0)

    def ms(values: list[float], share: float) -> str:
        return f"{percentile(values, share) * 1000:,.0f}" if values else "-"

    rows = [
        ("mode", f"{args.mode} ({texts} sentence{'s' if texts > 1 else ''} per request)"),
        ("capacity (closed loop)", f"{capacity:,.1f} req/s = {capacity * texts:,.0f} sentences/s"),
        (f"offered ({args.factor:g}x, open loop)", f"{rate:,.1f} req/s for {args.seconds:g} s = {len(over):,} "
                                                   f"requests (generator lag max {lag * 1000:,.0f} ms)"),
        ("answers by status", ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items()))),
        ("answered 200", f"{statuses.get('200', 0) / args.seconds:,.1f} req/s; latency p50 {ms(latencies, 50)} ms, "
                         f"p99 {ms(latencies, 99)} ms, max {ms(latencies, 100)} ms"),
        ("refused 503", f"{len(refusals):,}, all with Retry-After: {all(r.retry_after for r in refusals)}; "
                        f"latency p50 {ms(refusal_latency, 50)} ms, max {ms(refusal_latency, 100)} ms"),
        ("hung (> timeout + 5 s) / later than timeout", f"{statuses.get('hung', 0)} / {len(late)}"),
        ("server RSS idle / peak under overload / after",
         f"{idle_rss / 2**20:,.1f} / {max(rss_over, default=0) / 2**20:,.1f} / {after_rss / 2**20:,.1f} MiB"),
        ("recovery: first 1 s window >= 90% capacity", "not within the recovery run" if recovered_at is None
         else f"{recovered_at:.2f} s after the load dropped"),
        ("recovered throughput (best of last 1 s windows)", f"{steady:,} req/s = {steady / capacity:.0%} of capacity"),
    ]
    failures = []
    if statuses.get("hung"):
        failures.append(f"{statuses['hung']} hung requests")
    server_errors = {k: v for k, v in statuses.items() if k.startswith("5") and k != "503"}
    if server_errors:
        failures.append(f"5xx other than 503: {server_errors}")
    others = {k: v for k, v in statuses.items() if not k.isdigit() and k != "hung"}
    if others:
        failures.append(f"transport errors: {others}")
    if not all(r.retry_after for r in refusals):
        failures.append("a 503 without Retry-After")
    if late:
        failures.append(f"{len(late)} answers later than the request timeout")
    if recovered_at is None or recovered_at > 5.0:
        failures.append(f"recovery to 90% took {recovered_at} s (bar: 5 s)")
    figures = {"mode": args.mode, "capacity_rps": capacity, "texts_per_request": texts, "offered_rps": rate,
               "statuses": dict(statuses), "late": len(late), "idle_rss_bytes": idle_rss,
               "peak_rss_bytes": max(rss_over, default=0), "after_rss_bytes": after_rss, "recovered_s": recovered_at,
               "failures": failures}
    return rows, figures, failures


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loadtest.overload", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv")
    parser.add_argument("--mode", choices=sorted(MODES), default="multi", help="service mode (default multi)")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients (capacity, recovery)")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of capacity")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the overload lasts")
    parser.add_argument("--recovery-seconds", type=float, default=10.0)
    parser.add_argument("--request-timeout", type=float, default=10.0, help="the server's SCS_REQUEST_TIMEOUT_S")
    parser.add_argument("--connections", type=int, default=4000, help="most requests in flight from this client")
    parser.add_argument("--env", action="append", default=[], help="server setting KEY=VALUE (SCS_ prefix added)")
    parser.add_argument("--log", type=Path, help="server log (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.factor <= 0 or args.seconds <= 0 or args.capacity_seconds <= 0 or args.clients < 1:
        parser.error("--factor, --seconds and --capacity-seconds must be > 0, --clients >= 1")
    if not args.model_dir.is_dir() or not args.data.is_file():
        parser.error(f"no such model folder or data file: {args.model_dir}, {args.data}")
    env = {"SCS_GRPC_PORT": "0"}  # HTTP only: gRPC is measured by `python -m loadtest.bench --configs grpc`
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env {item!r}: expected KEY=VALUE")
        env[f"SCS_{key.upper()}"] = value
    env["SCS_REQUEST_TIMEOUT_S"] = str(args.request_timeout)
    on_the_load_core()
    log = args.log or Path(tempfile.mkdtemp(prefix="overload-")) / "service.log"

    def measure() -> int:
        server = start_service(args.mode, args.model_dir, log, env)
        try:
            rows, figures, failures = overload(args, server)
        finally:
            server.stop()
        width = max(len(name) for name, _ in rows)
        print(f"\n| {'overload check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
        for name, value in rows:
            print(f"| {name.ljust(width)} | {value} |")
        print(json.dumps(figures))
        return verdict(failures)

    return guarded(measure)

if __name__ == "__main__":
    sys.exit(main())
