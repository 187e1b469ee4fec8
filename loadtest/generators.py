"""The harness's two load generators, each a separate process pinned to the load core, and why each.

- Closed loop: ``wrk`` (C, one thread) with ``loadtest/wrk/classify.lua``, for every closed-loop figure the
  benchmark compares. A closed-loop figure is only the server's if the generator outruns the server. Measured
  against the raw constant app on the server core: one wrk thread sent 33,000 requests/s (4 clients) and 30,000
  (64) on about half of its core, while the geventhttpclient client below topped out at 19,000 and 16,500 with
  its core saturated; so with wrk the HTTP ceilings H_raw and H_fastapi are the servers', not the generator's.
- Closed loop over gRPC: ``h2load`` (nghttp2's HTTP/2 benchmark, C, one thread) posting one prebuilt gRPC message
  (``grpc_body``) on each of its connections, one call at a time per connection: wrk speaks no HTTP/2.
- Open loop: ``python -m loadtest.traffic`` (geventhttpclient): requests start on a fixed schedule whatever the
  latency, and each latency counts from the request's due time, so queueing shows (no coordinated omission);
  every request is recorded (status, Retry-After). wrk has no open loop (wrk2 is not packaged), and the rates an
  open loop offers here are a fraction of a server's peak, well within one Python process (``lag_ms`` says when
  it falls behind).

The runs that check every request rather than measure a peak (soak's latency windows, overload's capacity and
recovery, swap's answers against the model) drive the same ``loadtest.traffic`` client in process with a closed
schedule (``Traffic.closed``), and the accelerator check runs it as ``--clients N`` where wrk is not installed;
those are that generator's closed mode, not a third generator. ``loadtest.signals`` is a model of a Python caller
(an httpx keep-alive pool and a fresh-connection prober), and Locust is the user-facing load test (``make
loadtest``, the compose ``loadtest`` profile): neither produces the harness's figures.

Each returns one row: requests/s, sentences/s, p50/p90/p99 in ms, errors, and ``load_cpu`` (the generator's
CPU seconds per second it ran, start-up included: near 1.0 means the generator itself was the bottleneck).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from .processes import finish, spawn

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk" / "classify.lua"
WRK = shutil.which("wrk")
H2LOAD = shutil.which("h2load")
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def wrk(url: str, connections: int, seconds: float, bodies: Path, core: int | str | None,
        path: str = "/classify") -> dict:
    """``connections`` closed-loop clients for ``seconds`` (whole seconds: wrk takes no fractions), to ``path``."""
    seconds = max(1, round(seconds))
    argv = [WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "--latency",
            "-s", str(WRK_SCRIPT), url, "--", str(bodies), path]
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


def open_loop(url: str, rate: float, seconds: float, bodies: Path, core: int | str | None, grace: float = 5.0,
              path: str = "/classify") -> dict:
    argv = [sys.executable, "-m", "loadtest.traffic", "--url", url, "--rate", f"{rate:.3f}",
            "--seconds", f"{seconds:g}", "--bodies", str(bodies), "--grace", f"{grace:g}", "--path", path]
    code, output, _ = finish(spawn(argv, core, capture=True, cwd=HERE.parent), timeout=seconds + grace + 30)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"open loop failed (exit {code}): {output.strip()[-300:]}")
    return json.loads(lines[-1])  # its own load_cpu: measured over the run, not the interpreter's start


def grpc_body(model: str, text: str) -> bytes:
    """One length-prefixed gRPC message: a ModelInferRequest for ``text`` with raw_input_contents, as tritonclient
    sends it."""
    import struct

    from service.grpc_messages import ModelInferRequest
    from service.v2_tensors import pack_bytes

    request = ModelInferRequest(model_name=model)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(pack_bytes([text]))
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message


def h2load(target: str, connections: int, seconds: float, body: Path, core: int | str | None) -> dict:
    """``connections`` closed-loop gRPC clients (one call in flight each) for ``seconds`` against ``target``
    (host:port), each call ``body`` (``grpc_body``) to ModelInfer. h2load sees HTTP statuses only: a gRPC error
    status (in the trailers) is counted by the caller from the server's metrics."""
    import statistics
    import tempfile

    seconds = max(1, round(seconds))
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log") as log:
        argv = [H2LOAD, "-t1", f"-c{connections}", "-m1", f"-D{seconds}", "-d", str(body),
                "-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log.name}",
                f"http://{target}{GRPC_INFER}"]
        code, output, cpu = finish(spawn(argv, core, capture=True), timeout=seconds + 40)
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines() if line.count("\t") == 2]
    done = re.search(r"finished in ([\d.]+)(m?s)", output)
    if code != 0 or not done or not rows:
        raise RuntimeError(f"h2load failed (exit {code}): {output.strip()[-300:]}")
    duration = float(done.group(1)) / (1000 if done.group(2) == "ms" else 1)
    ok = [int(elapsed) / 1000 for _, status, elapsed in rows if status == "200"]
    failed = len(rows) - len(ok)
    cuts = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else ok * 99
    return {"requests": len(rows), "errors": failed, "rps": len(ok) / duration, "sentences_per_s": len(ok) / duration,
            "p50_ms": cuts[49], "p90_ms": cuts[89], "p99_ms": cuts[98], "load_cpu": cpu}
