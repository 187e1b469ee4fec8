"""Signals under load: a stop loses no request a client sent, and a killed worker is replaced while the rest serve.

    python -m loadtest.signals stop [--workers 2] [--runs 5] [--clients 32]    # SIGTERM to the service
    python -m loadtest.signals kill [--runs 1] [--clients 32]                  # SIGKILL one of 2 workers

Each run starts ``python -m service`` on 127.0.0.1 and ``--clients`` closed-loop clients on one httpx pool of as
many keep-alive connections (what a Python caller of the service looks like), each sending one sentence at a time,
plus one prober that opens a new connection for every request (what a caller behind a fresh connection sees).
Every request ends one way:
- ``answered``: 200;
- ``refused``: a 503 (``draining``, with ``Retry-After``) or a connection refused at connect: the client knows
  its request was not taken and may send it elsewhere;
- ``lost``: sent and never answered (reset, disconnected, timed out): what a stop must never do.

``stop``: after ``--before`` seconds of load, SIGTERM. Every client goes on until its connection is refused. Bars
per run: 0 lost, exit code 0.

``kill``: two workers; after ``--before`` seconds one of them is killed (SIGKILL) and the load goes on for
``--after`` seconds. Bars: the requests lost are at most the connections the killed worker held (one request in
flight each at most: only its own requests fail); no second without an answer after the kill (the other worker
serves throughout); the replacement answers a request (its access log line) within ``--replace-within`` seconds
(10). Then a SIGTERM must still stop the service with exit code 0.

Prints a row per run and a verdict; exits 1 when a bar fails.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from .data import read_sentences
from .modes import ROOT
from .processes import Parser, Server, free_port, guarded, interrupt_on_signals, verdict


@dataclass(slots=True)
class Outcome:
    sent: float  # monotonic
    done: float
    kind: str  # answered, refused or lost
    detail: str  # the status, or the error's type


def classify(sent: float, result: httpx.Response | BaseException) -> Outcome:
    done = time.monotonic()
    if isinstance(result, httpx.Response):
        kind = {200: "answered", 503: "refused"}.get(result.status_code, "failed")
        return Outcome(sent, done, kind, str(result.status_code))
    if isinstance(result, httpx.ConnectError):  # refused at connect: never sent
        return Outcome(sent, done, "refused", "connect_refused")
    return Outcome(sent, done, "lost", type(result).__name__)


class Load:
    """``clients`` keep-alive loops and one fresh-connection prober against ``url``, until told to stop."""

    def __init__(self, url: str, sentences: list[str], clients: int) -> None:
        self.url, self.sentences, self.clients = url, sentences, clients
        self.outcomes: list[Outcome] = []
        self.stop_at = float("inf")  # monotonic: no request is sent after it
        self.until_refused = False  # a loop stops once its connection is refused (the port closed)

    async def _loop(self, client: httpx.AsyncClient, index: int, fresh: bool) -> None:
        headers = {"Connection": "close"} if fresh else {}
        sent_count = 0
        while time.monotonic() < self.stop_at:
            text = self.sentences[(index * 7919 + sent_count) % len(self.sentences)]
            sent_count += 1
            sent = time.monotonic()
            try:
                result: httpx.Response | BaseException = await client.post("/classify", json={"text": text},
                                                                           headers=headers)
            except httpx.HTTPError as error:
                result = error
            outcome = classify(sent, result)
            self.outcomes.append(outcome)
            if self.until_refused and outcome.detail == "connect_refused":
                return
            if fresh or outcome.kind != "answered":
                await asyncio.sleep(0.05)

    async def run(self, during) -> None:
        """Run the load while ``during()`` (a coroutine function) does its part; then let every loop finish."""
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=30) as pool, \
                httpx.AsyncClient(base_url=self.url, timeout=30) as prober:
            loops = [asyncio.ensure_future(self._loop(pool, i, False)) for i in range(self.clients)]
            loops.append(asyncio.ensure_future(self._loop(prober, self.clients, True)))
            try:
                await during()
                await asyncio.wait_for(asyncio.gather(*loops), 60)
            finally:
                for loop in loops:
                    loop.cancel()

    def after(self, moment: float) -> Counter:
        return Counter(o.kind for o in self.outcomes if o.sent >= moment)


def start(args, workers: int, log: Path, extra: dict[str, str] | None = None) -> Server:
    port = free_port()
    env = {"SCS_WORKERS": str(workers), "SCS_PROVIDER": "cpu", "SCS_LOG_LEVEL": "info", "SCS_GRPC_PORT": "0"} | (extra or {})
    server = Server(f"service ({workers} workers)", [sys.executable, "-m", "service", "--model-dir",
                                                     str(args.model_dir), "--host", "127.0.0.1", "--port", str(port)],
                    port, env)
    server.start(None, log)
    return server


def workers_of(server: Server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(p.cmdline())]


def held_connections(process: psutil.Process, port: int) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
               for c in process.net_connections(kind="tcp"))


def stop_run(args, run: int, log: Path) -> dict:
    server = start(args, args.workers, log)
    load = Load(server.url, args.sentences, args.clients)
    marks: dict[str, float] = {}

    async def during() -> None:
        await asyncio.sleep(args.before)
        marks["signal"] = time.monotonic()
        load.until_refused = True
        load.stop_at = marks["signal"] + 60
        server.process.send_signal(signal.SIGTERM)
        while server.process.poll() is None and time.monotonic() < marks["signal"] + 60:
            await asyncio.sleep(0.02)
        marks["exited"] = time.monotonic()
        load.stop_at = 0  # the port is closed: nothing more to send

    try:
        asyncio.run(load.run(during))
        code = server.process.wait(30)
    finally:
        server.stop()
    counts = load.after(marks["signal"])
    lost = Counter(o.detail for o in load.outcomes if o.kind == "lost")
    failures = []
    if lost:
        failures.append(f"run {run}: {sum(lost.values())} requests lost ({dict(lost)})")
    if code != 0:
        failures.append(f"run {run}: exit code {code}")
    return {"mode": "stop", "run": run, "workers": args.workers, "requests": len(load.outcomes),
            "after_signal": dict(counts), "lost": sum(lost.values()), "lost_kinds": dict(lost), "exit_code": code,
            "stopped_in_s": round(marks["exited"] - marks["signal"], 2), "failures": failures}


def first_answer_by_new_pid(log: Path, old: set[int], since: float) -> float | None:
    """Seconds from ``since`` (wall clock) to the first access line of a worker pid not in ``old``."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "service.access" and entry.get("pid") not in old and "pid" in entry:
            moment = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=timezone.utc).timestamp()
            if moment >= since:
                return moment - since
    return None


def kill_run(args, run: int, log: Path) -> dict:
    server = start(args, 2, log, {"SCS_ACCESS_LOG": "true"})
    load = Load(server.url, args.sentences, args.clients)
    marks: dict[str, float] = {}
    victim: dict = {}

    async def during() -> None:
        await asyncio.sleep(args.before)
        workers = {w: held_connections(w, server.port) for w in workers_of(server)}
        target = max(workers, key=workers.get)  # the busier one
        victim.update(pid=target.pid, pids={w.pid for w in workers}, connections=workers[target],
                      others=sum(workers.values()) - workers[target])
        marks["kill"], marks["kill_wall"] = time.monotonic(), time.time()
        target.kill()
        load.stop_at = marks["kill"] + args.after
        await asyncio.sleep(args.after)

    try:
        asyncio.run(load.run(during))
        time.sleep(0.5)
        replaced_in = first_answer_by_new_pid(log, victim["pids"], marks["kill_wall"])
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)
    finally:
        server.stop()
    after = sorted(o.done for o in load.outcomes if o.kind == "answered" and o.done >= marks["kill"])
    gaps = [b - a for a, b in zip([marks["kill"], *after], after)]
    lost = Counter(o.detail for o in load.outcomes if o.kind == "lost")
    failures = []
    if sum(lost.values()) > victim["connections"]:
        failures.append(f"run {run}: {sum(lost.values())} requests lost, more than the {victim['connections']} "
                        f"connections the killed worker held")
    if not gaps or max(gaps) > 1.0:
        failures.append(f"run {run}: {max(gaps, default=float('inf')):.2f} s without an answer after the kill")
    if replaced_in is None or replaced_in > args.replace_within:
        failures.append(f"run {run}: no answer from a replacement worker within {args.replace_within:g} s")
    if code != 0:
        failures.append(f"run {run}: exit code {code} after the SIGTERM that followed")
    return {"mode": "kill", "run": run, "requests": len(load.outcomes), "after_kill": dict(load.after(marks["kill"])),
            "killed_worker_connections": victim["connections"], "other_worker_connections": victim["others"],
            "lost": sum(lost.values()),
            "lost_kinds": dict(lost), "longest_gap_s": round(max(gaps, default=float("inf")), 3),
            "replacement_answered_after_s": None if replaced_in is None else round(replaced_in, 2),
            "exit_code": code, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loadtest.signals", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["stop", "kill"])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv")
    parser.add_argument("--workers", type=int, default=2, help="stop: server processes (default 2)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--before", type=float, default=2.0, help="seconds of load before the signal")
    parser.add_argument("--after", type=float, default=12.0, help="kill: seconds of load after it")
    parser.add_argument("--replace-within", type=float, default=10.0)
    parser.add_argument("--log", type=Path, help="folder for the service logs (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.clients < 1 or args.workers < 1:
        parser.error("--runs, --clients and --workers must be >= 1")
    try:
        args.sentences = read_sentences(args.data)
    except ValueError as error:
        parser.error(str(error))
    interrupt_on_signals()
    folder = args.log or Path(tempfile.mkdtemp(prefix="signals-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = []

    def measure() -> int:
        for run in range(1, args.runs + 1):
            log = folder / f"{args.mode}-{run}.log"
            result = (stop_run if args.mode == "stop" else kill_run)(args, run, log)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "failures"}), flush=True)
        print(json.dumps({"mode": args.mode, "runs": args.runs, "clients": args.clients, "logs": str(folder)}))
        return verdict([f for r in results for f in r["failures"]])

    return guarded(measure)


if __name__ == "__main__":
    sys.exit(main())
