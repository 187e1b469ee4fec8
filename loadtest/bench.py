"""Benchmark harness: the service beside its ceilings and baselines, measured side by side in one run.

    python -m loadtest.bench                          # what `make bench` runs
    python -m loadtest.bench --configs on,off --concurrency 1,64 --seconds 4 --benchmarks none

Configurations (``--configs``, in this order by default): ``on`` (the service, defaults), ``off`` (the service with
``SCS_MAX_BATCH_SIZE=1``), ``naive`` (FastAPI + onnxruntime, one model run per request), ``fastapi`` (constant
FastAPI answer: H_fastapi), ``raw`` (constant raw ASGI on the service's uvicorn settings: H_raw), ``v2`` (the
service through the Open Inference Protocol, binary tensors as tritonclient sends them), ``grpc`` (the service
through the protocol's gRPC service, driven by ``h2load`` with one prebuilt call) and ``grpc-const`` (a constant
ModelInfer answer from grpcio's asyncio server with the service's gRPC settings: G_const). Every server
starts up front, pinned to the server core (``taskset``); the harness and the load generator stay on the load
core. Then, for each of ``--rounds`` rounds, each concurrency level, each configuration in turn gets a closed-loop
point from ``wrk``: what is compared at one level was measured seconds apart, so the machine's drift over minutes
cancels out; with several rounds each figure is the median round. An open loop at fixed rates follows, and the
model ceiling M (the artifact in process, one thread on the server core, best length-grouped batch, with and
without tokenization). The report (``report.py``) prints the ceilings, the ratios at every level and the bars;
the exit code is 1 when a bar fails or a configuration could not be measured. Outputs: ``bench.json``,
``bench.md`` and ``bench.png`` in ``--out``, and (only after a complete run) the section between the markers in
BENCHMARKS.md. Every process it starts is stopped when it ends, fails or is interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import contract

from . import generators, report
from .data import Sample, metric, read_sentences, request_bodies, scrape, write_bodies
from .peers import PEERS, python_for
from .processes import TASKSET, Parser, Server, core_busy_seconds, free_port, interrupt_on_signals, stop_all

ROOT = Path(__file__).resolve().parent.parent
# gRPC off but in the grpc configuration (several services run at once); the response cache off but in the cached
# configuration (the bench's bodies repeat: the other figures are the model path's)
SERVER_ENV = {"SCS_INTRA_OP_THREADS": "1", "SCS_LOG_LEVEL": "warning", "SCS_PROVIDER": "cpu", "SCS_WORKERS": "1",
              "SCS_GRPC_PORT": "0", "SCS_CACHE_MAX_BYTES": "0"}
CACHE_BYTES = 32 * 2**20  # the cached configuration's SCS_CACHE_MAX_BYTES: the service's default
ALL_CORES = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    service: bool = False  # exposes the service's /metrics (batch sizes, padding)
    cwd: Path | None = None
    protocol: str = "classify"  # "v2": Open Inference Protocol requests, binary tensors, to path; "grpc": ModelInfer
    path: str = "/classify"
    grpc_port: int | None = None  # protocol "grpc": the port h2load calls (the HTTP port serves readiness, metrics)
    cores: str | None = None  # pinned to these cores instead of the server core
    ready_path: str = "/readyz"
    peer: bool = False
    pausable: bool = True


KNOWN = ("on", "cached", "off", "naive", "fastapi", "raw", "v2", "grpc", "grpc-const", "cores", "reference", "traced",
         "traced-sampled", "traced-dead", *PEERS)
COLLECTED = ("traced", "traced-sampled")  # the configurations that export to the harness's OTLP receiver
DEFAULT = ("on", "off", "naive", "fastapi", "raw", "v2", "grpc", "grpc-const")

def configs(model_dir: Path, port_of, reference: Path | None = None,
            peer_python: dict[str, Path] | None = None) -> dict[str, Config]:
    """Every configuration the harness knows, each on its own free port. ``reference``: another checkout of the
    project, whose service runs (batching on) beside this one's, for A/B comparisons of a change."""
    python, model = sys.executable, ["--model-dir", str(model_dir.resolve())]
    peer_python = peer_python or {}

    def where(name: str) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port_of(name))]

    return {
        "on": Config("on", "service, batching on (defaults)", [python, "-m", "service", *model, *where("on")],
                     SERVER_ENV, service=True),
        "cached": Config("cached", f"service, batching on, response cache on ({CACHE_BYTES // 2**20} MiB)",
                         [python, "-m", "service", *model, *where("cached")],
                         SERVER_ENV | {"SCS_CACHE_MAX_BYTES": str(CACHE_BYTES)}, service=True),
        "off": Config("off", "service, batching off (SCS_MAX_BATCH_SIZE=1)",
                      [python, "-m", "service", *model, *where("off")], SERVER_ENV | {"SCS_MAX_BATCH_SIZE": "1"},
                      service=True),
        "naive": Config("naive", "naive FastAPI + onnxruntime, one run per request",
                        [python, "-m", "loadtest.baselines.naive", *model, *where("naive")]),
        "fastapi": Config("fastapi", "constant answer, FastAPI (H_fastapi)",
                          [python, "-m", "loadtest.baselines.constant_app", *model, *where("fastapi")]),
        "raw": Config("raw", "constant answer, raw ASGI on the service's uvicorn (H_raw)",
                      [python, "-m", "loadtest.baselines.constant_app", "--raw", *model, *where("raw")]),
        "v2": Config("v2", "service, batching on, V2 infer with binary tensors",
                     [python, "-m", "service", *model, *where("v2")], SERVER_ENV, service=True, protocol="v2",
                     path=f"/v2/models/{model_name(model_dir)}/infer"),
        "grpc": Config("grpc", "service, batching on, V2 over gRPC (ModelInfer, raw contents)",
                       [python, "-m", "service", *model, *where("grpc")],
                       SERVER_ENV | {"SCS_GRPC_PORT": str(port_of("grpc-port"))}, service=True, protocol="grpc",
                       grpc_port=port_of("grpc-port")),
        "grpc-const": Config("grpc-const", "constant answer, grpcio asyncio server (G_const)",
                             [python, "-m", "loadtest.baselines.constant_grpc", *model, *where("grpc-const"),
                              "--grpc-port", str(port_of("grpc-const-port"))], protocol="grpc",
                             grpc_port=port_of("grpc-const-port")),
        # Tracing's cost: every request traced into a live OTLP receiver (loadtest/otlp_receiver.py, started on the
        # load core), and pointed at a port nobody listens on.
        "traced": Config("traced", "service, batching on, every request traced (a live OTLP receiver)",
                         [python, "-m", "service", *model, *where("traced")],
                         SERVER_ENV | {"SCS_OTEL_ENDPOINT": f"http://127.0.0.1:{port_of('collector')}",
                                       "SCS_OTEL_SAMPLE_RATIO": "1"}, service=True),
        "traced-sampled": Config("traced-sampled",
                                 "service, batching on, 10% of requests traced (a live OTLP receiver)",
                                 [python, "-m", "service", *model, *where("traced-sampled")],
                                 SERVER_ENV | {"SCS_OTEL_ENDPOINT": f"http://127.0.0.1:{port_of('collector')}",
                                               "SCS_OTEL_SAMPLE_RATIO": "0.1"}, service=True),
        "traced-dead": Config("traced-dead", "service, batching on, every request traced, collector down",
                              [python, "-m", "service", *model, *where("traced-dead")],
                              SERVER_ENV | {"SCS_OTEL_ENDPOINT": f"http://127.0.0.1:{port_of('nobody')}",
                                            "SCS_OTEL_SAMPLE_RATIO": "1"}, service=True),
        "cores": Config("cores", f"service, one worker per core ({ALL_CORES})",
                        [python, "-m", "service", *model, *where("cores")],
                        SERVER_ENV | {"SCS_WORKERS": str(len(ALL_CORES.split(",")))}, service=True, cores=ALL_CORES),
        "reference": Config("reference", f"service, batching on, from {reference}",
                            [python, "-m", "service", *model, *where("reference")], SERVER_ENV, service=True,
                            cwd=reference),
    } | {name: Config(name, peer.title, [str(peer_python.get(name, python)), str(peer.script), *model, "--port",
                                          str(port_of(name))], {}, protocol=peer.protocol,
                      path="/classify" if peer.protocol == "classify" else f"/v2/models/{model_name(model_dir)}/infer",
                      ready_path=peer.ready_path.format(model=model_name(model_dir)), peer=True,
                      pausable=peer.pausable)
         for name, peer in PEERS.items()}


def model_name(model_dir: Path) -> str:
    """The name the repository serves ``model_dir``'s model under (its model folder's name)."""
    folder = contract.version_folder(model_dir).resolve()
    return folder.parent.name


def model_ceiling(version_dir: Path, sentences: list[str], core: int | None, seconds: float,
                  sizes=(1, 8, 16, 32, 64, 128)) -> dict:
    """M: sentences/s of the model in process on one thread, pinned like the servers, by batch size, with and
    without tokenization in each run (``model_export.bench``, torch-free). A ceiling is the best the machine
    does, so each figure is the better of two tries (this machine's speed drifts)."""
    from model_export.bench import sentences_per_second

    before = os.sched_getaffinity(0)
    if core is not None and core in before:
        os.sched_setaffinity(0, {core})
    try:
        artifact = contract.check(version_dir, intra_op_threads=1)
        sentences_per_second(artifact, sentences[:64], 64, False, 0.3, True)  # warm up
        rows = []
        for size in sizes:  # each figure is the better of two tries, with and without tokenization alternating
            best = {False: 0.0, True: 0.0}
            for tokenize in (False, True, False, True):
                rate = sentences_per_second(artifact, sentences, size, size > 1, seconds / 2, tokenize)
                best[tokenize] = max(best[tokenize], rate)
            rows += [{"batch": size, "tokenize": tokenize, "sentences_per_s": rate} for tokenize, rate in best.items()]
    finally:
        os.sched_setaffinity(0, before)
    best = {key: max((r for r in rows if r["tokenize"] == tokenize), key=lambda r: r["sentences_per_s"])
            for key, tokenize in (("M", False), ("M_tok", True))}
    return {"rows": rows, **best}


def measure(server: Server, config: Config, level: int, args, mode: str = "closed") -> dict:
    """One point, measured again once if other work took more than ``args.max_other_cpu`` of the server's core."""
    for attempt in (1, 2):
        row = _measure_once(server, config, level, args, mode)
        row["attempts"] = attempt
        if row.get("other_cpu") is None or row["other_cpu"] <= args.max_other_cpu:
            break
        say(f"{config.name}: {row['other_cpu']:.2f} of core {args.server_core} went to other processes; "
            + ("measuring again" if attempt == 1 else "keeping this point, marked"))
    return row


def _measure_once(server: Server, config: Config, level: float, args, mode: str) -> dict:
    watched = args.server_core if args.pinned and not config.cores else None
    samples = scrape(server.url) if config.service else []
    threads = server.thread_cpu_seconds()
    cpu, core, started = server.cpu_seconds(), core_busy_seconds(watched), time.monotonic()
    bodies = args.bodies_paths[config.protocol]
    if config.protocol == "grpc":
        row = generators.h2load(f"127.0.0.1:{config.grpc_port}", int(level), args.seconds, bodies, args.load_core)
    elif mode == "open":
        row = generators.open_loop(server.url, level, args.open_seconds, bodies, args.load_core, path=config.path)
    else:
        row = generators.wrk(server.url, int(level), args.seconds, bodies, args.load_core, config.path)
    elapsed = time.monotonic() - started
    server_cpu = (server.cpu_seconds() - cpu) / elapsed
    core_after = core_busy_seconds(watched)
    row.update(config=config.name, mode=mode, load=level if mode == "open" else int(level), server_cpu=server_cpu,
               other_cpu=None if core is None or core_after is None
               else max(0.0, (core_after - core) / elapsed - server_cpu))
    answered = row["rps"] * elapsed
    if answered:
        spent = server.thread_cpu_seconds()
        row["cpu_us_per_request"] = {role: (spent[role] - threads[role]) / answered * 1e6 for role in spent}
    if config.service:
        after = scrape(server.url)
        delta = {name: metric(after, name) - metric(samples, name) for name in (
            "scs_batch_size_sentences_sum", "scs_batch_size_sentences_count", "scs_padded_tokens_total",
            "scs_real_tokens_total", "scs_cache_hits_total", "scs_cache_misses_total")}
        if delta["scs_batch_size_sentences_count"]:
            row["mean_batch"] = delta["scs_batch_size_sentences_sum"] / delta["scs_batch_size_sentences_count"]
        if delta["scs_cache_hits_total"] + delta["scs_cache_misses_total"]:
            row["cache_hit_ratio"] = delta["scs_cache_hits_total"] / (delta["scs_cache_hits_total"]
                                                                       + delta["scs_cache_misses_total"])
        if delta["scs_real_tokens_total"]:
            row["padding_ratio"] = delta["scs_padded_tokens_total"] / delta["scs_real_tokens_total"]
        if config.protocol == "grpc":  # h2load sees HTTP statuses only: a gRPC error status is in the trailers
            failed = grpc_failures(after) - grpc_failures(samples)
            row["errors"] += failed
            row["rps"] -= failed / elapsed
            row["sentences_per_s"] -= failed / elapsed
    return row


def grpc_failures(samples: Sequence[Sample]) -> float:
    """Calls the service answered with a gRPC status other than OK, from its metrics (CANCELLED aside: h2load
    cancels the calls in flight when its time is up)."""
    return sum(sample.value for sample in samples if sample.name == "scs_requests_total"
               and sample.labels.get("protocol") == "grpc" and sample.labels.get("status") not in ("OK", "CANCELLED"))


def median_sentence(version_dir: Path, sentences: list[str]) -> str:
    """The sentence of median token length: h2load sends one prebuilt gRPC call, so the gRPC points carry this one
    (the HTTP points carry every sentence in turn; one length makes the batches pad nothing)."""
    lengths = [len(ids) for ids in contract.check(version_dir).encoder.encode(sentences)[0]]
    middle = sorted(lengths)[len(lengths) // 2]
    return next(text for text, length in zip(sentences, lengths) if length == middle)


def wrong_answers(url: str, config: Config, args) -> str | None:
    """Why a peer's answers differ from a direct onnxruntime run of each sentence alone (None: they agree)."""
    import httpx
    import numpy as np

    artifact = contract.check(args.version_dir)
    texts = args.sentences[:16]
    ids = artifact.encoder.encode(texts)[0]
    direct = np.concatenate([artifact.session.run(None, contract.inputs([s], artifact.manifest.pad_id,
                                                                              artifact.manifest.input_names))[0]
                             for s in ids])
    labels = artifact.labels
    try:
        for index, text in enumerate(texts):
            if config.protocol == "v2":
                body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}
                answer = httpx.post(url + config.path, json=body, timeout=30).json()
                got = np.array(answer["outputs"][0]["data"], dtype=np.float64)
                worst = float(np.abs(got - direct[index]).max())
            else:
                answer = httpx.post(url + config.path, json={"text": text}, timeout=30).json()
                top = answer["predictions"][0]["probabilities"]
                worst = max(abs(p - direct[index][labels.index(label)]) for label, p in top.items())
            if worst > contract.TOLERANCE:
                return f"its answer to {text!r} differs from a direct run by {worst:.2e}"
    except (httpx.HTTPError, KeyError, ValueError, IndexError) as error:
        return f"no usable answer ({type(error).__name__}: {error})"
    return None


def cache_equality(url: str, sentences: list[str], classes: int) -> dict:
    """Cached answers against uncached ones over ``sentences`` (one per cache key), every probability: filled in
    requests of 64 (misses, stored), the same requests again with ``"cache": false`` (the same batches, so the
    model's own bits), then everything again from the cache in requests of another size and order."""
    import random

    import httpx

    texts = list({text.lower(): text for text in sentences}.values())

    def answers(order: list[str], size: int, **fields) -> dict[str, dict]:
        found = {}
        with httpx.Client(base_url=url, timeout=60) as client:
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                reply = client.post("/classify", json={"texts": chunk, "top_k": classes} | fields)
                reply.raise_for_status()
                found |= {text: p["probabilities"] for text, p in zip(chunk, reply.json()["predictions"])}
        return found

    answers(texts, 64)
    uncached = answers(texts, 64, cache=False)
    again = texts[:]
    random.Random(1).shuffle(again)
    hits = metric(scrape(url), "scs_cache_hits_total")
    cached = answers(again, 48)
    equal = sum(cached[text] == uncached[text] for text in texts)
    return {"sentences": len(texts), "bit_equal": equal,
            "all_hits": metric(scrape(url), "scs_cache_hits_total") - hits == len(texts)}


def median_points(points: list[dict]) -> list[dict]:
    """Per (configuration, mode, load): the round with the median requests/s (the upper one of an even count)."""
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        groups.setdefault((point["config"], point["mode"], point["load"]), []).append(point)
    chosen = []
    for group in groups.values():
        ordered = sorted(group, key=lambda p: p["rps"])
        middle = dict(ordered[len(ordered) // 2])
        if len(group) > 1:
            middle["rounds_rps"] = [round(p["rps"], 1) for p in group]
            middle["rps_median"] = statistics.median(p["rps"] for p in group)
        chosen.append(middle)
    return chosen


def run(args, run_data: dict, log_dir: Path) -> None:
    ports: dict[str, int] = {}
    wanted = [name for name in args.configs if name in PEERS]
    with ThreadPoolExecutor(max(1, len(wanted))) as pool:  # their virtualenvs install side by side (pip waits on I/O)
        peer_python = dict(zip(wanted, pool.map(lambda name: python_for(PEERS[name], say), wanted)))
    known = configs(args.model_dir, lambda name: ports.setdefault(name, free_port()), args.reference, peer_python)
    chosen = [known[name] for name in args.configs]
    servers: dict[str, Server] = {}
    collector = None
    if set(COLLECTED) & set(args.configs):  # the collector the traced services export to
        collector = Server("collector", [sys.executable, "-m", "loadtest.otlp_receiver", "--port",
                                         str(ports["collector"])], ports["collector"], {}, pausable=False)
        collector.start(args.load_core, log_dir / "collector.log")
    for config in chosen:
        server = Server(config.name, config.argv, ports[config.name], config.env, ready_path=config.ready_path,
                        cwd=config.cwd, pausable=config.pausable)
        shown = ["PORT" if arg == str(ports[config.name]) else arg for arg in config.argv[1:]]
        run_data["commands"][config.name] = " ".join([f"{k}={v}" for k, v in config.env.items()]
                                                     + ["python", *shown]).replace(str(ROOT) + "/", "")
        say(f"{config.name}: starting `{' '.join(config.argv[1:])}`")
        try:
            server.start(config.cores or args.server_core, log_dir / f"{config.name}.log")
        except RuntimeError as error:
            run_data["skipped"][config.name] = str(error)[:300]
            say(f"{config.name}: not measured: {error}")
            continue
        servers[config.name] = server
        say(f"{config.name}: ready on {server.url} (pid {server.process.pid})")
        if config.peer:
            problem = wrong_answers(server.url, config, args)
            if problem:
                run_data["skipped"][config.name] = problem
                say(f"{config.name}: not measured: {problem}")
                server.stop()
                del servers[config.name]
                continue
        if args.warmup > 0:
            _measure_once(server, config, 8, argparse.Namespace(**{**vars(args), "seconds": args.warmup}), "closed")
        server.pause()
    live = [config for config in chosen if config.name in servers]
    points = run_data["raw_points"]
    for round_number in range(1, args.rounds + 1):
        for level in args.concurrency:
            for config in list(live):
                try:
                    servers[config.name].resume()
                    point = measure(servers[config.name], config, level, args) | {"round": round_number}
                except (RuntimeError, TimeoutError, OSError) as error:  # one broken server costs only its figures
                    run_data["skipped"][config.name] = str(error)[:300]
                    say(f"{config.name}: stopped measuring it: {error}")
                    live.remove(config)
                    continue
                finally:
                    servers[config.name].pause()
                points.append(point)
                say(f"round {round_number} {config.name:>8} c={level:<4} {point['rps']:8.0f} req/s "
                    f"{point['sentences_per_s']:8.0f} sentences/s p50 {point['p50_ms']:7.2f} p99 "
                    f"{point['p99_ms']:7.2f} ms errors {point['errors']} (server CPU {point['server_cpu']:.2f}, "
                    f"others on its core {_share(point['other_cpu'])}, load CPU {point['load_cpu']:.2f})")
    run_data["points"] = median_points(points)
    if "cached" in servers:
        servers["cached"].resume()
        try:
            run_data["cache_equality"] = cache_equality(servers["cached"].url, args.sentences,
                                                        contract.read_manifest(args.version_dir).num_classes)
        finally:
            servers["cached"].pause()
        say(f"cached vs uncached: {run_data['cache_equality']}")
    for rate in open_rates(run_data, args):
        for config in [c for c in live if c.protocol != "grpc"]:  # the open loop speaks HTTP/1.1 only
            servers[config.name].resume()
            try:
                point = measure(servers[config.name], config, rate, args, mode="open")
            finally:
                servers[config.name].pause()
            run_data["points"].append(point)
            say(f"{config.name:>8} open {rate:7.0f} req/s -> {point['rps']:7.0f} answered, p50 {point['p50_ms']:7.1f} "
                f"p99 {point['p99_ms']:7.1f} ms errors {point['errors']} (lag {point['lag_ms']:.0f} ms)")
    for server in servers.values():
        server.stop()  # a traced service exports what it still holds as it stops
    if collector is not None:
        import httpx

        run_data["collector"] = httpx.get(collector.url + "/spans", timeout=10).json()
        collector.stop()


def extra_runs(args, run_data: dict, log_dir: Path) -> None:
    """The priority overload and the cache's RSS flood, when asked for (each on the server core)."""
    if args.priority_overload:
        from .priorities import priority_overload

        say("priority overload: 3x capacity, 10% of requests at priority 1, priorities on then off")
        run_data["priorities"] = priority_overload(args.model_dir, args.data, log_dir, say=say)
    if args.cache_rss:
        say(f"cache RSS: {args.cache_rss:,} distinct texts into a {CACHE_BYTES // 2**20} MiB cache")
        argv = [sys.executable, "-m", "loadtest.cache_rss", "--model-dir", str(args.model_dir), "--data",
                str(args.data), "--texts", str(args.cache_rss), "--max-bytes", str(CACHE_BYTES)]
        if TASKSET is not None and args.pinned:
            argv = [TASKSET, "-c", str(args.server_core), *argv]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            run_data["skipped"]["cache-rss"] = done.stderr[-300:]
        else:
            run_data["cache_rss"] = json.loads(done.stdout.strip().splitlines()[-1])
            say(f"cache RSS: {run_data['cache_rss']}")


def open_rates(run_data: dict, args) -> list[float]:
    """Open-loop arrival rates: fractions of the first configuration's peak requests/s."""
    if not args.open_fractions or not run_data["points"]:
        return []
    first = next((c for c in args.configs if report.peak(run_data["points"], c)), None)
    if first is None:
        return []
    best = report.peak(run_data["points"], first)
    run_data["open_reference"] = {"config": first, "rps": best["rps"]}
    return [round(fraction * best["rps"], 1) for fraction in args.open_fractions]


def machine(args) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"Python {platform.python_version()}"]
    for package in ("onnxruntime", "fastapi", "uvicorn", "tokenizers", "geventhttpclient", "grpcio"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    code = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    if code.returncode == 0:
        versions.append(f"project {code.stdout.strip()}")
    probe = subprocess.run([generators.WRK, "--version"], capture_output=True, text=True)
    versions.append((probe.stdout + probe.stderr).split("Copyright")[0].strip())
    if generators.H2LOAD:
        probe = subprocess.run([generators.H2LOAD, "--version"], capture_output=True, text=True)
        versions.append(probe.stdout.strip().splitlines()[0] if probe.stdout.strip() else "h2load")
    manifest = contract.read_manifest(args.version_dir)
    config = manifest.training.get("config", {})
    pinning = (f"servers pinned to core {args.server_core} and load to core {args.load_core} with taskset"
               if args.pinned else "NOT pinned (taskset missing or too few cores): servers and load share the CPUs")
    shown = args.version_dir.relative_to(ROOT) if args.version_dir.is_relative_to(ROOT) else args.version_dir
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
        "pinning": pinning, "versions": ", ".join(versions),
        "model": (f"{manifest.name} v{manifest.version} ({shown}; embedding {config.get('embedding_dim', '?')}, "
                  f"hidden {config.get('hidden_size', '?')}, {manifest.num_classes} classes)"
                  if manifest.model_kind == "lstm" else
                  f"{manifest.name} v{manifest.version} ({shown}; imported {manifest.training.get('model_type', '?')} "
                  f"encoder, {config.get('num_hidden_layers', '?')} layers, hidden {config.get('hidden_size', '?')}, "
                  f"{manifest.num_classes} classes)"),
        "model_kind": manifest.model_kind,
        "mix": (f"{100 - args.multi_percent}% one text, {args.multi_percent}% 2-{args.multi_max} texts"
                if args.multi_percent else f"{args.texts} text{'s' if args.texts > 1 else ''} per request")
               + f" ({args.mean_sentences:.2f} sentences per request on average), sentences from {args.data.name}"
               + {"uniform": ", drawn uniformly", "zipf": f", drawn by a Zipf law (s={args.zipf_s:g}) over them",
                  "distinct": ", each made distinct (a number no request sent before appended)"}[args.workload],
        "workload": args.workload, "zipf_s": args.zipf_s,
        "generator": f"wrk (HTTP) and h2load (gRPC: every call the sentence of median length, "
                     f"{getattr(args, 'grpc_text', '')!r}), 1 thread, closed loop (one connection per client, one "
                     f"request at a time); {args.seconds:g} s per point, "
                     f"{args.rounds} round(s), {args.warmup:g} s warm-up; open loop: python -m loadtest.traffic "
                     f"(geventhttpclient), {args.open_seconds:g} s per rate",
        "command": "python -m loadtest.bench" + "".join(f" {a}" for a in sys.argv[1:]),
        "max_other_cpu": args.max_other_cpu,
    }


def say(message: str) -> None:
    print(message, flush=True)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _numbers(kind, text: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m loadtest.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77",
                        help="model folder (models/x) or version folder (models/x/1); default: models/banking77")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv",
                        help="CSV with a 'text' column: the sentences sent (default: Banking77 test split)")
    parser.add_argument("--configs", default=",".join(DEFAULT),
                        help="comma-separated, in order, from: " + ", ".join(KNOWN))
    parser.add_argument("--peers", action="store_true",
                        help="also measure " + " and ".join(PEERS) + " (each in a virtualenv made in artifacts/peers)")
    parser.add_argument("--reference", type=Path,
                        help="another checkout of this project: its service is the 'reference' configuration")
    parser.add_argument("--concurrency", type=lambda t: _numbers(int, t), default=[1, 8, 32, 64, 128],
                        help="closed-loop client counts (default 1,8,32,64,128)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per closed-loop point (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every level this many times (median)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per configuration (default 3)")
    parser.add_argument("--texts", type=int, default=1, help="sentences per request (default 1)")
    parser.add_argument("--multi-percent", type=int, default=0,
                        help="instead of --texts: this share of requests carries 2..--multi-max texts, the rest one")
    parser.add_argument("--multi-max", type=int, default=8, help="most texts in a multi-text request (default 8)")
    parser.add_argument("--workload", choices=("uniform", "zipf", "distinct"), default="uniform",
                        help="the sentences each request carries: drawn uniformly from --data (default), by a Zipf "
                             "law over them (--zipf-s), or each made distinct by a number no request sent before")
    parser.add_argument("--zipf-s", type=float, default=1.1, help="the Zipf exponent of --workload zipf (default 1.1)")
    parser.add_argument("--priority-overload", action="store_true",
                        help="also: 3x capacity open loop, 10%% of requests at priority 1, priorities on vs off "
                             "(loadtest/priorities.py)")
    parser.add_argument("--cache-rss", type=int, default=0, metavar="TEXTS",
                        help="also: the response cache's RSS under a flood of this many distinct texts "
                             "(loadtest/cache_rss.py; the issue's bar uses 1000000)")
    parser.add_argument("--open-fractions", type=lambda t: _numbers(float, t), default=[0.25, 0.5, 0.75],
                        help="open-loop rates as fractions of the first configuration's peak req/s")
    parser.add_argument("--no-open", dest="open_fractions", action="store_const", const=[], help="skip the open loop")
    parser.add_argument("--open-seconds", type=float, default=6.0, help="seconds per open-loop rate (default 6)")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the in-process model ceiling")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="seconds per ceiling batch size")
    parser.add_argument("--max-other-cpu", type=float, default=0.1,
                        help="measure a point again when other processes used more than this share of the server "
                             "core during it (default 0.1)")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results", help="where results go")
    parser.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"),
                        help="Markdown file whose marked section gets the report after a complete run ('none': never)")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in KNOWN]
    if unknown or not chosen:
        parser.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(KNOWN)}")
    if args.peers:
        chosen += [name for name in PEERS if name not in chosen]
    if ("reference" in chosen) != (args.reference is not None):
        parser.error("the 'reference' configuration and --reference CHECKOUT go together")
    if args.reference is not None and not (args.reference / "service" / "__main__.py").is_file():
        parser.error(f"--reference {args.reference}: not a checkout of this project (no service/__main__.py)")
    args.configs = chosen
    if args.seconds <= 0 or args.open_seconds <= 0 or args.warmup < 0 or args.ceiling_seconds <= 0 or args.rounds < 1:
        parser.error("--seconds, --open-seconds and --ceiling-seconds must be > 0, --warmup >= 0, --rounds >= 1")
    if not 0 <= args.multi_percent <= 100 or args.multi_max < 2 or args.texts < 1:
        parser.error("--texts must be >= 1, --multi-percent 0-100 and --multi-max >= 2")
    if not generators.WRK:
        parser.error("wrk is not installed: `make bench-tools` (Debian: apt-get install -y wrk)")
    if not generators.H2LOAD and any(c.startswith("grpc") for c in chosen):
        parser.error("h2load is not installed: `make bench-tools` (Debian: apt-get install -y nghttp2-client)")
    try:
        args.version_dir = contract.version_folder(args.model_dir)
        contract.read_manifest(args.version_dir)
        args.sentences = read_sentences(args.data)
    except (contract.ArtifactError, ValueError) as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    interrupt_on_signals()
    log_dir = args.out / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write there ({error.strerror})")
    args.bodies_paths = {protocol: log_dir / f"bodies-{protocol}.tsv" for protocol in ("classify", "v2")}
    count = max(250, 4000 // args.texts)  # about 4,000 sentences: wrk decodes them all at start-up, on its core
    for protocol, path in args.bodies_paths.items():
        args.mean_sentences = write_bodies(request_bodies(args.sentences, args.texts, args.multi_percent,
                                                          args.multi_max, count, protocol=protocol,
                                                          workload=args.workload, zipf_s=args.zipf_s), path)
    args.grpc_text = median_sentence(args.version_dir, args.sentences)
    args.bodies_paths["grpc"] = log_dir / "body-grpc.bin"
    args.bodies_paths["grpc"].write_bytes(generators.grpc_body(model_name(args.model_dir), args.grpc_text))
    run_data = {"configs": args.configs, "names": {}, "raw_points": [], "points": [], "skipped": {}, "commands": {}}
    args.pinned = TASKSET is not None and (os.cpu_count() or 1) > max(args.server_core, args.load_core)
    if not args.pinned:
        say("taskset missing or too few cores: servers and load generator are NOT pinned to separate cores")
    started, load_before = time.monotonic(), _load_average()
    try:
        if args.ceiling:
            say(f"model ceiling: in process on core {args.server_core}, {args.version_dir}")
            run_data["ceiling"] = model_ceiling(args.version_dir, args.sentences, args.server_core,
                                                args.ceiling_seconds)
            for row in run_data["ceiling"]["rows"]:
                say(f"  batch {row['batch']:>4}{' +tokenize' if row['tokenize'] else '':>10}: "
                    f"{row['sentences_per_s']:8.0f} sentences/s")
        if args.pinned:
            os.sched_setaffinity(0, {args.load_core})  # the harness itself stays off the server's core
        run(args, run_data, log_dir)
        extra_runs(args, run_data, log_dir)
    except KeyboardInterrupt:
        say("interrupted: stopping every process started")
        return 130
    finally:
        stop_all()
    run_data["names"] = {name: config.title for name, config in configs(args.model_dir, lambda _: 0,
                                                                         args.reference).items()}
    run_data["peers"] = [name for name in args.configs if name in PEERS]
    run_data["meta"] = machine(args) | {"seconds": round(time.monotonic() - started),
                                        "load_average": f"{load_before} before the run, {_load_average()} after it"}
    run_data["bars"] = report.bars(run_data)
    write_outputs(run_data, args)
    failed = [bar["bar"] for bar in run_data["bars"] if bar["passed"] is False]
    if run_data["skipped"]:
        say(f"not measured: {', '.join(run_data['skipped'])}")
    if failed:
        say(f"bars failed: {'; '.join(failed)}")
    return 1 if failed or run_data["skipped"] or not run_data["points"] else 0


def write_outputs(run_data: dict, args) -> None:
    for point in run_data["points"] + run_data["raw_points"]:
        for key, value in list(point.items()):
            if isinstance(value, float):
                point[key] = round(value, 3)
    (args.out / "bench.json").write_text(json.dumps(run_data, indent=1) + "\n", encoding="utf-8")
    report.plot(run_data, args.out / "bench.png")
    (args.out / "bench.md").write_text(report.markdown(run_data, "bench.png"), encoding="utf-8")
    say("")
    say(report.markdown(run_data, plot_name=None))
    complete = not run_data["skipped"] and set(args.configs) >= set(DEFAULT)
    if args.benchmarks != "none":
        if not complete:
            say(f"left {args.benchmarks} as it was: only a complete run (every configuration measured) rewrites it")
            return
        target = Path(args.benchmarks)
        relative = os.path.relpath(args.out / "bench.png", target.resolve().parent)
        report.update_benchmarks(target, report.markdown(run_data, relative))
        say(f"wrote {args.out}/bench.{{json,md,png}} and the report section of {target}")


def _load_average() -> str:
    """The 1-minute load average: how busy the machine was with other work (it is shared)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    sys.exit(main())
