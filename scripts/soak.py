"""Soak: about half of the measured capacity, open loop, for a fixed time; zero errors, flat memory.

    python scripts/soak.py [--minutes 10] [--share 0.5] [--model-dir models/banking77]

Starts ``python -m service`` on 127.0.0.1 (core 0; this generator on core 1), measures capacity with a
closed loop, then offers ``share`` x capacity on a fixed schedule for ``--minutes``. Server RSS is read from
/proc every second; drift is (RSS at the end - RSS at minute 2) / RSS at minute 2 (from 20% of the run
when it is shorter than 10 minutes). Prints one row per minute and a verdict; exits 1 when any request
failed or drift >= 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gevent

from overload import ROOT, Load, Tally, bodies, sample_rss, with_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--share", type=float, default=0.5, help="offered load as a share of capacity")
    parser.add_argument("--texts", type=int, default=8, help="sentences per request")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients for the capacity figure")
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--env", action="append", default=[], help="server setting KEY=VALUE (SCS_ prefix added)")
    parser.add_argument("--log", type=Path, default=Path("/tmp/soak-service.log"))
    args = parser.parse_args(argv)
    if args.minutes <= 0 or not 0 < args.share <= 1 or args.texts < 1:
        parser.error("--minutes > 0, 0 < --share <= 1, --texts >= 1")
    return with_server(args, run)


def run(args, server) -> int:
    pid = server.process.pid
    load = Load(server.url, bodies(args.texts), 2000, args.request_timeout + 5.0)
    load.closed(args.clients, 3.0, Tally())
    capacity_tally = Tally()
    started = time.perf_counter()
    load.closed(args.clients, 10.0, capacity_tally)
    capacity = capacity_tally.by_status().get("200", 0) / (time.perf_counter() - started)
    rate = args.share * capacity
    seconds = args.minutes * 60
    print(f"capacity {capacity:,.1f} req/s; offering {rate:,.1f} req/s ({args.share:.0%}) x {args.texts} sentences "
          f"for {args.minutes:g} min", flush=True)
    rss: list[tuple[float, int]] = []
    sampler = gevent.spawn(sample_rss, pid, rss, 1.0)
    tally = Tally()
    start = time.perf_counter()
    group, lag = load.open(rate, seconds, tally)
    group.join(timeout=args.request_timeout + 10)
    sampler.kill()

    print("\n| minute | requests | errors | p99 ms | RSS MiB (end of minute) |\n|---:|---:|---:|---:|---:|")
    for minute in range(int(-(-seconds // 60))):
        lo, hi = start + 60 * minute, start + 60 * (minute + 1)
        records = [r for r in tally.records if lo <= r.due < hi]
        latencies = sorted(r.done - r.due for r in records if r.status == "200")
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000 if latencies else 0
        kib = [k for t, k in rss if t < hi]
        print(f"| {minute + 1} | {len(records):,} | {sum(r.status != '200' for r in records)} | {p99:,.1f} | "
              f"{(kib[-1] if kib else 0) / 1024:,.1f} |")
    statuses = tally.by_status()
    errors = sum(v for k, v in statuses.items() if k != "200")
    base_at = start + min(120.0, 0.2 * seconds)
    base = next((k for t, k in rss if t >= base_at), 0)
    end = rss[-1][1] if rss else 0
    drift = (end - base) / base if base else float("inf")
    print(f"\nrequests {len(tally.records):,} ({statuses}), errors {errors}, generator lag max {lag * 1000:,.0f} ms; "
          f"RSS at {base_at - start:.0f} s {base / 1024:,.1f} MiB, at end {end / 1024:,.1f} MiB, drift {drift:+.2%}; "
          f"peak {max((k for _, k in rss), default=0) / 1024:,.1f} MiB")
    failures = [f"{errors} failed requests"] if errors else []
    if not abs(drift) < 0.10:
        failures.append(f"RSS drift {drift:+.1%} (bar: < 10%)")
    print(json.dumps({"capacity_rps": capacity, "offered_rps": rate, "minutes": args.minutes, "statuses": statuses,
                      "rss_base_kib": base, "rss_end_kib": end, "drift": drift, "failures": failures}))
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
