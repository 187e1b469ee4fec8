"""The service's throughput bar in one run: M, H, batching on and off, on one pinned core.

    python scripts/bench_service.py [--model-dir models/banking77] [--seconds 10]

- M: the served model in process (service.runtime), one thread, sentences/s at its best length-grouped
  batch size (test sentences sorted by token length, cut into batches, batches run in random order).
- H: requests/s of a FastAPI endpoint that answers a constant, served exactly like the service.
- on / off: requests/s of ``python -m service`` with batching on (defaults) and off (max_batch_size=1),
  measured in ``--rounds`` alternating pairs (off, on, off, on, ...): a shared machine's speed drifts by 10-20%
  over minutes, so each on/off ratio compares two runs a few seconds apart, and the table reports the
  median over the rounds (each round's figures are listed too).
Every server runs pinned to ``--server-cpu`` (taskset) and wrk (Debian package ``wrk``) to ``--load-cpu``,
sending the 3,080 Banking77 test sentences as single-sentence requests. Bars: on >= 3x off, and
on >= 70% of the composite ceiling 1 / (1/M + 1/H); at 1 client, p50(on) within 10% of p50(off).
Prints a Markdown table; ``--json`` writes the figures too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
sys.path.insert(0, str(ROOT))  # `service` without installing the project


def sentences() -> list[str]:
    with (ROOT / "data" / "banking77" / "test.csv").open(encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- M: the model in process -------------------------------------------------------------------------

def measure_model(model_dir: Path, texts: list[str], cpu: int, seconds: float, sizes=(8, 16, 32, 64, 128)) -> dict:
    from service.runtime import load_runtime

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        runtime = load_runtime(model_dir, provider="cpu", intra_op_threads=1, inter_op_threads=1)
        runtime.warmup()
        ordered = sorted((e.ids for e in runtime.encode(texts)), key=len)
        rows = {}
        for size in sizes:
            batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
            random.Random(0).shuffle(batches)
            done, position, started = 0, 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                batch = batches[position % len(batches)]
                runtime.run(batch)
                done, position = done + len(batch), position + 1
            rows[size] = done / (time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, before)
    best = max(rows, key=rows.get)
    return {"by_batch": {str(k): round(v) for k, v in rows.items()}, "best_batch": best, "sentences_per_s": rows[best],
            "model": f"{runtime.artifact.name}/{runtime.artifact.version}"}


# --- servers ---------------------------------------------------------------------------------------------

def constant_app():
    """H: the cheapest useful FastAPI endpoint: POST /classify answers the same JSON every time."""
    from fastapi import FastAPI

    app = FastAPI()
    answer = {"model": "constant", "version": "1", "predictions": [{"label": "card_arrival", "score": 1.0,
                                                                    "probabilities": {"card_arrival": 1.0},
                                                                    "truncated": False}]}

    @app.post("/classify")
    async def classify() -> dict:
        return answer

    return app


def serve_constant(port: int) -> None:
    import uvicorn

    uvicorn.run(constant_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                server_header=False)


def start(command: list[str], cpu: int, port: int, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen(["taskset", "-c", str(cpu), *command], cwd=ROOT, env=os.environ | (env or {}),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: {' '.join(command)} exited: {process.stderr.read().decode()[-2000:]}")
        try:
            probe = "/readyz" if "service" in command else "/docs"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=1) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"error: {' '.join(command)} did not become ready")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, from /proc (Linux); empty elsewhere."""
    tick, found = os.sysconf("SC_CLK_TCK"), {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            found[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # stat fields 14-15: utime, stime
    except OSError:
        return {}
    return found


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("scs_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# --- load: wrk ------------------------------------------------------------------------------------------

def wrk_script(texts: list[str], folder: Path) -> Path:
    """A wrk Lua script that cycles through the sentences, one per request, as ``{"text": ...}`` bodies."""
    bodies = []
    for text in texts:
        body = json.dumps({"text": text})
        level = "=" * next(n for n in range(1, 10) if f"]{'=' * n}]" not in body)
        bodies.append(f"[{level}[{body}]{level}]")
    path = folder / "classify.lua"
    path.write_text(
        "local bodies = {\n" + ",\n".join(bodies) + "\n}\n"
        "local headers = {[\"Content-Type\"] = \"application/json\"}\n"
        "local i = 0\n"
        "function init(args) i = math.random(#bodies) end\n"
        "function request()\n  i = i % #bodies + 1\n"
        "  return wrk.format(\"POST\", \"/classify\", headers, bodies[i])\nend\n",
        encoding="utf-8")
    return path


def wrk(port: int, script: Path, connections: int, seconds: float, cpu: int) -> dict:
    command = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
               "-s", str(script), f"http://127.0.0.1:{port}/classify"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise SystemExit(f"error: wrk printed no rate:\n{out}")
    rate = float(found.group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    latency = {p: _ms(m) for p, m in re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M)}
    return {"requests_per_s": rate, "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1).strip() if errors else "", "p50_ms": latency.get("50"),
            "p90_ms": latency.get("90"), "p99_ms": latency.get("99")}


def _cpu(run: dict) -> str:
    split = run.get("cpu_us_per_request")
    if not split:
        return "n/a"
    return f"{split['event_loop']:,.0f} + {split['model_thread']:,.0f} us"


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def bench_service(model_dir: Path, script: Path, args, batching: bool) -> dict:
    port = free_port()
    env = {"SCS_LOG_LEVEL": "warning", "SCS_PROVIDER": "cpu"} | ({} if batching else {"SCS_MAX_BATCH_SIZE": "1"})
    process = start([PYTHON, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)],
                    args.server_cpu, port, env)
    try:
        wrk(port, script, args.connections, 2, args.load_cpu)  # warm up
        before, cpu_before = scrape(port), thread_cpu_seconds(process.pid)
        loaded = wrk(port, script, args.connections, args.seconds, args.load_cpu)
        after, cpu_after = scrape(port), thread_cpu_seconds(process.pid)
        single = wrk(port, script, 1, args.seconds, args.load_cpu)
    finally:
        stop(process)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    batches = delta.get("scs_batch_size_sentences_count", 0)
    # Where a request's CPU goes: the event loop's thread (HTTP, parsing, tokenizing, batching) and the rest
    # (the model's worker thread: onnxruntime and the batch's numpy work).
    requests = loaded["requests_per_s"] * args.seconds
    spent = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
    split = None
    if spent:
        loop = spent.get(process.pid, 0.0)  # the main thread's id is the process id
        split = {"event_loop": loop / requests * 1e6, "model_thread": (sum(spent.values()) - loop) / requests * 1e6}
    return loaded | {
        "cpu_us_per_request": split,
        "one_client": single,
        "mean_batch": delta.get("scs_batch_size_sentences_sum", 0) / batches if batches else 0,
        "padding_ratio": delta["scs_padded_tokens_total"] / delta["scs_real_tokens_total"]
        if delta.get("scs_real_tokens_total") else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_model = ROOT / "models" / "banking77"
    parser.add_argument("--model-dir", type=Path,
                        default=default_model if default_model.is_dir() else ROOT / "artifacts" / "test-model")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load run (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating off/on pairs (default 3)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--serve-constant", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_constant:
        serve_constant(args.serve_constant)
        return 0
    if args.rounds < 1 or args.seconds <= 0:
        print("error: --rounds must be at least 1 and --seconds above 0", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (Debian: apt-get install -y wrk; or `make bench-service`)", file=sys.stderr)
        return 2
    if not args.model_dir.is_dir():
        print(f"error: {args.model_dir}: no such model folder", file=sys.stderr)
        return 2
    texts = sentences()
    with tempfile.TemporaryDirectory() as folder:
        script = wrk_script(texts, Path(folder))
        model = measure_model(args.model_dir, texts, args.server_cpu, min(args.seconds, 5))
        port = free_port()
        constant = start([PYTHON, str(Path(__file__).resolve()), "--serve-constant", str(port)], args.server_cpu, port)
        try:
            wrk(port, script, args.connections, 2, args.load_cpu)
            h = wrk(port, script, args.connections, args.seconds, args.load_cpu)
        finally:
            stop(constant)
        rounds = []
        for number in range(1, args.rounds + 1):
            off = bench_service(args.model_dir, script, args, batching=False)
            on = bench_service(args.model_dir, script, args, batching=True)
            rounds.append({"off": off, "on": on, "on_over_off": on["requests_per_s"] / off["requests_per_s"],
                           "p50_1_client_on_over_off": on["one_client"]["p50_ms"] / off["one_client"]["p50_ms"]})
            print(f"round {number}/{args.rounds}: off {off['requests_per_s']:,.0f} req/s, on {on['requests_per_s']:,.0f} "
                  f"req/s, on/off {rounds[-1]['on_over_off']:.2f}x", file=sys.stderr, flush=True)
    m, h_rate = model["sentences_per_s"], h["requests_per_s"]
    ceiling = 1 / (1 / m + 1 / h_rate)
    by_ratio = sorted(rounds, key=lambda r: r["on_over_off"])
    middle = by_ratio[len(by_ratio) // 2]  # the median round (upper median for an even count)
    result = {"model": model, "constant": h, "rounds": rounds, "ceiling": ceiling,
              "batching_off": middle["off"], "batching_on": middle["on"],
              "on_over_off": statistics.median(r["on_over_off"] for r in rounds),
              "on_over_ceiling": statistics.median(r["on"]["requests_per_s"] for r in rounds) / ceiling,
              "p50_1_client_on_over_off": statistics.median(r["p50_1_client_on_over_off"] for r in rounds)}
    print(table(result, args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def table(r: dict, args) -> str:
    on, off, model = r["batching_on"], r["batching_off"], r["model"]
    rows = [
        ("M: model in process, 1 thread, grouped batch " + str(model["best_batch"]),
         f"{model['sentences_per_s']:,.0f} sentences/s", "by batch: " + ", ".join(
             f"{k}: {v:,}" for k, v in model["by_batch"].items())),
        ("H: constant FastAPI endpoint", f"{r['constant']['requests_per_s']:,.0f} req/s",
         f"p50 {r['constant']['p50_ms']:.2f} ms"),
        ("ceiling 1/(1/M + 1/H)", f"{r['ceiling']:,.0f} req/s", ""),
        ("service, batching off (max_batch_size=1), median round", f"{off['requests_per_s']:,.0f} req/s",
         f"p50 {off['p50_ms']:.2f} ms, p99 {off['p99_ms']:.2f} ms, non-2xx {off['non_2xx']}"),
        ("service, batching on, median round", f"{on['requests_per_s']:,.0f} req/s",
         f"p50 {on['p50_ms']:.2f} ms, p99 {on['p99_ms']:.2f} ms, non-2xx {on['non_2xx']}, mean batch "
         f"{on['mean_batch']:.1f}, padded/real tokens {on['padding_ratio']:.2f}"),
        ("CPU per request: event loop + model thread", _cpu(off) + " (off); " + _cpu(on) + " (on)",
         "from /proc per-thread times; the model thread's share is per sentence here"),
        ("on / off, median of rounds", f"{r['on_over_off']:.2f}x", "bar: >= 3x; rounds: " + ", ".join(
            f"{x['on']['requests_per_s']:,.0f}/{x['off']['requests_per_s']:,.0f} = {x['on_over_off']:.2f}x"
            for x in r["rounds"])),
        ("on / ceiling (median on)", f"{r['on_over_ceiling']:.0%}", "bar: >= 70%"),
        ("1 client p50: on vs off", f"{on['one_client']['p50_ms']:.3f} vs {off['one_client']['p50_ms']:.3f} ms",
         f"median ratio {r['p50_1_client_on_over_off']:.2f} (bar: <= 1.10)"),
    ]
    head = (f"model {model['model']}; server on CPU {args.server_cpu}, wrk on CPU {args.load_cpu}; "
            f"{args.connections} clients, {args.seconds:g} s per run, {len(r['rounds'])} off/on rounds, "
            "single-sentence requests\n\n")
    lines = ["| measurement | result | notes |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return head + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
