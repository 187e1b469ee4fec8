"""Soak: each service mode under steady load for a while; zero errors, flat memory, flat latency.

    python -m loadtest.soak [--modes on,off,multi,workers] [--seconds 30] [--clients 8]     # what `make soak` runs

For each mode (``loadtest.modes``: batching on, batching off, 8-text requests, two workers) a fresh ``python -m service`` on
127.0.0.1 (core 0, or every core with workers; this generator on core 1) gets a 3 s warm-up, then ``--clients`` closed-loop clients for
``--seconds``. Its resident memory is read every 0.5 s. Bars per mode: no failed request; RSS growth from the end
of the warm-up to the end under ``--max-growth-mb`` (5); p99 latency of the last 10 s within ``--max-p99-ratio``
(1.5) of the first 10 s. A leak of a few kB per request (what batching off once had) fails the growth bar within
seconds. Prints a row per mode and a verdict; exits 1 when a bar fails.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import gevent

from .data import percentile
from .modes import MODES, ROOT, bodies, parse_modes, start_service
from .processes import Parser, guarded, on_the_load_core, verdict
from .traffic import Traffic, sample_rss


def soak(mode: str, args, log: Path) -> dict:
    server = start_service(mode, args.model_dir, log)
    try:
        traffic = Traffic(server.url, bodies(mode, args.data), connections=args.clients, limit_s=30)
        traffic.closed(args.clients, 3.0)  # warm-up: allocator pools and onnxruntime's arenas settle
        rss: list[tuple[float, int]] = []
        sampler = gevent.spawn(sample_rss, server, rss, 0.5)
        gevent.sleep(0)
        start = time.perf_counter()
        records = traffic.closed(args.clients, args.seconds)
        sampler.kill()
        traffic.close()
    finally:
        server.stop()
    window = min(10.0, args.seconds / 3)
    first = [r.done - r.due for r in records if r.status == "200" and r.due < start + window]
    last = [r.done - r.due for r in records if r.status == "200" and r.due >= start + args.seconds - window]
    errors = sum(r.status != "200" for r in records)
    growth_mb = (rss[-1][1] - rss[0][1]) / 1e6 if len(rss) >= 2 else float("nan")
    p99_first, p99_last = percentile(first, 99) * 1e3, percentile(last, 99) * 1e3
    failures = []
    if errors:
        failures.append(f"{errors} failed requests")
    if not growth_mb < args.max_growth_mb:
        failures.append(f"RSS grew {growth_mb:.1f} MB (bar: < {args.max_growth_mb:g})")
    if not p99_last <= args.max_p99_ratio * p99_first:
        failures.append(f"p99 went from {p99_first:.1f} to {p99_last:.1f} ms (bar: <= {args.max_p99_ratio:g}x)")
    return {"mode": mode, "texts_per_request": MODES[mode][1], "requests": len(records), "errors": errors,
            "rps": len(records) / args.seconds, "rss_start_mb": rss[0][1] / 1e6 if rss else 0,
            "rss_end_mb": rss[-1][1] / 1e6 if rss else 0, "rss_growth_mb": growth_mb, "window_s": window,
            "p99_first_ms": p99_first, "p99_last_ms": p99_last, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loadtest.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv")
    parser.add_argument("--modes", default="on,off,multi,workers", help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--seconds", type=float, default=30.0, help="steady load per mode (default 30)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients (default 8)")
    parser.add_argument("--max-growth-mb", type=float, default=5.0)
    parser.add_argument("--max-p99-ratio", type=float, default=1.5)
    parser.add_argument("--log", type=Path, help="server log (default: a temporary file)")
    args = parser.parse_args(argv)
    try:
        modes = parse_modes(args.modes)
    except ValueError as error:
        parser.error(str(error))
    if args.seconds < 3 or args.clients < 1:
        parser.error("--seconds must be >= 3 and --clients >= 1")
    if not args.model_dir.is_dir() or not args.data.is_file():
        parser.error(f"no such model folder or data file: {args.model_dir}, {args.data}")
    on_the_load_core()
    log = args.log or Path(tempfile.mkdtemp(prefix="soak-")) / "service.log"
    results = []

    def measure() -> int:
        for mode in modes:
            result = soak(mode, args, log)
            results.append(result)
            print(f"{mode}: {result['requests']:,} requests in {args.seconds:g} s, {result['errors']} errors, RSS "
                  f"{result['rss_start_mb']:.1f} -> {result['rss_end_mb']:.1f} MB ({result['rss_growth_mb']:+.2f}), "
                  f"p99 first/last {result['window_s']:g} s {result['p99_first_ms']:.1f} / "
                  f"{result['p99_last_ms']:.1f} ms: " + ("PASS" if not result["failures"] else "FAIL"), flush=True)
        print(json.dumps({"seconds": args.seconds, "clients": args.clients, "results": results}))
        return verdict([f"{r['mode']}: {f}" for r in results for f in r["failures"]])

    return guarded(measure)

if __name__ == "__main__":
    sys.exit(main())
