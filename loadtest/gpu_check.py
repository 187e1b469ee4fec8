"""The accelerator check: one prepared run that proves the CUDA path (or measures the CPU one the same way).

    python -m loadtest.gpu_check --provider cuda --out loadtest/results/gpu    # on the GPU machine (scripts/gpu_check.sh)
    python -m loadtest.gpu_check --provider cpu --out /tmp/gpu-check --quick   # the same steps here, on the CPU

It records the machine (GPU name, driver and CUDA from nvidia-smi, onnxruntime version, the provider each session
really got) and measures, writing ``results.json`` and ``report.md`` in ``--out``:
1. parity: every test sentence alone on ``--provider`` vs alone on the CPU (max abs diff, argmax changes);
2. batch invariance on ``--provider``: each sentence alone vs inside shuffled padded batches of 17, 64, 256 and
   1024 (max abs diff, argmax changes), against the contract's bound of 1e-5;
3. throughput in process at batch 1, 64, 256 and 1024 (length-grouped), with tokenization;
4. through HTTP: ``python -m service --provider ...`` with each batching setting of ``--batching`` at 64 and 256
   clients (closed loop, ``loadtest.traffic`` processes on the cores the server does not use), and whether
   ``/v1/model`` and V2 answer on that provider;
5. ``--workers 1,2,4,8``: the CPU service with that many workers on that many cores, 64-text requests.
Exits 1 when a check fails (wrong provider, a bound broken, an HTTP error).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import contract

from .data import read_sentences, request_bodies
from .processes import Parser, Server, free_port, guarded, interrupt_on_signals

ROOT = Path(__file__).resolve().parent.parent
CUDA = "CUDAExecutionProvider"
# Candidates for the batching defaults on a GPU. "default" is what the service does on the provider unasked
# (on CUDA: service.settings.CUDA_BATCH_DEFAULTS); "cpu" the CPU defaults, set explicitly.
BATCHINGS = {"cpu": {"SCS_MAX_BATCH_SIZE": "64", "SCS_MAX_BATCH_TOKENS": "4096"},
             "default": {},
             "default+wait": {"SCS_MAX_WAIT_MS": "2"},
             "1024": {"SCS_MAX_BATCH_SIZE": "1024", "SCS_MAX_BATCH_TOKENS": "65536"}}


def machine() -> dict:
    import onnxruntime as ort

    found = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
             "python": platform.python_version(), "cpu_cores": os.cpu_count()}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        if query.returncode == 0:
            found["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
        version = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        found["cuda"] = next((part.split(":")[1].split()[0] for part in version.split("|") if "CUDA Version" in part),
                             None)
    except (OSError, subprocess.TimeoutExpired):
        found["gpus"] = []
    return found


def providers(choice: str) -> list[str]:
    return [CUDA, contract.CPU] if choice == "cuda" else [contract.CPU]


def alone(artifact: contract.Artifact, ids: list[list[int]]) -> np.ndarray:
    pad = artifact.manifest.pad_id
    return np.concatenate([artifact.session.run(None, contract.inputs([s], pad, artifact.manifest.input_names))[0]
                           for s in ids])


def in_batches(artifact: contract.Artifact, ids: list[list[int]], size: int, seed: int) -> np.ndarray:
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    out = np.zeros((len(ids), artifact.manifest.num_classes), dtype=np.float32)
    for start in range(0, len(order), size):
        index = order[start:start + size]
        out[index] = artifact.session.run(None, contract.inputs([ids[i] for i in index], artifact.manifest.pad_id,
                                                                   artifact.manifest.input_names))[0]
    return out


def differences(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(a - b).max()), "argmax_changes": int((a.argmax(1) != b.argmax(1)).sum())}


def model_checks(args, texts: list[str]) -> dict:
    from model_export.bench import sentences_per_second

    device = contract.check(args.version_dir, providers(args.provider), intra_op_threads=0 if args.provider == "cuda"
                            else 1)
    cpu = contract.check(args.version_dir, [contract.CPU], intra_op_threads=1)
    got = device.session.get_providers()[0]
    ids = device.encoder.encode(texts)[0]
    reference = alone(device, ids)
    result = {"provider_asked": args.provider, "provider_used": got, "sentences": len(texts),
              "parity_vs_cpu": differences(reference, alone(cpu, ids)),
              "invariance": {str(size): differences(in_batches(device, ids, size, seed), reference)
                             for seed, size in enumerate((17, 64, 256, 1024))}}
    result["throughput"] = {str(size): round(sentences_per_second(device, texts, size, size > 1, args.seconds, True))
                            for size in (1, 64, 256, 1024)}
    return result


def http_point(url: str, path: str, bodies_path: Path, clients: int, seconds: float, cores: list[int]) -> dict:
    """``clients`` closed-loop clients split over one ``loadtest.traffic --clients`` process per load core (wrk,
    the benchmark's closed loop, is a Debian package the GPU machine may not have)."""
    procs = max(1, len(cores))
    children = []
    for index in range(procs):
        share = clients // procs + (1 if index < clients % procs else 0)
        pin = ["taskset", "-c", str(cores[index])] if cores else []
        children.append(subprocess.Popen([*pin, sys.executable, "-m", "loadtest.traffic", "--url", url, "--clients",
                                          str(share), "--seconds", f"{seconds:g}", "--bodies", str(bodies_path),
                                          "--path", path], cwd=ROOT, stdout=subprocess.PIPE, text=True))
    rows = [json.loads(child.communicate(timeout=seconds + 120)[0].strip().splitlines()[-1]) for child in children]
    return {"clients": clients, "rps": sum(r["rps"] for r in rows), "sentences_per_s": sum(r["sentences_per_s"] for r in rows),
            "p99_ms": max(r["p99_ms"] for r in rows), "errors": sum(r["errors"] for r in rows)}


def serve(args, env: dict[str, str], cores: list[int], log: Path) -> Server:
    port = free_port()
    server = Server("service", [sys.executable, "-m", "service", "--model-dir", str(args.model_dir), "--host",
                                "127.0.0.1", "--port", str(port)], port,
                    {"SCS_LOG_LEVEL": "warning", "SCS_PROVIDER": args.provider, "SCS_GRPC_PORT": "0"} | env)
    server.start(",".join(map(str, cores)) if cores else None, log)
    return server


def http_checks(args, texts: list[str], out: Path) -> dict:
    import httpx

    all_cores = sorted(os.sched_getaffinity(0))
    server_cores, load_cores = all_cores[: max(1, len(all_cores) // 2)], all_cores[max(1, len(all_cores) // 2):]
    bodies = {}
    for protocol in ("classify", "v2"):
        bodies[protocol] = out / f"bodies-{protocol}.tsv"
        from .data import write_bodies

        write_bodies(request_bodies(texts, count=2000, protocol=protocol), bodies[protocol])
    results = {}
    for name in args.batching:
        server = serve(args, BATCHINGS[name] | {"SCS_WORKERS": "1"}, server_cores, out / f"service-{name}.log")
        try:
            summary = httpx.get(f"{server.url}/v1/model", timeout=10).json()
            model = summary["model"]["name"]
            row = {"env": BATCHINGS[name], "provider_reported": summary["provider"], "batching": summary["batching"],
                   "points": []}
            for clients in args.clients:
                row["points"].append({"route": "/classify"} | http_point(server.url, "/classify", bodies["classify"],
                                                                         clients, args.seconds, load_cores))
            row["points"].append({"route": "v2"} | http_point(server.url, f"/v2/models/{model}/infer", bodies["v2"],
                                                              args.clients[0], args.seconds, load_cores))
            results[name] = row
        finally:
            server.stop()
    return results


def scaling(args, texts: list[str], out: Path) -> dict:
    from .data import write_bodies

    bodies = out / "bodies-64.tsv"
    write_bodies(request_bodies(texts, texts=64, count=200), bodies)
    all_cores = sorted(os.sched_getaffinity(0))
    rows = {}
    for workers in args.workers:
        if 2 * workers > len(all_cores) and workers > 1:
            rows[str(workers)] = "skipped: needs as many spare cores for the load"
            continue
        server_cores, load_cores = all_cores[:workers], all_cores[workers:workers + max(1, workers // 2)]
        server = serve(args, {"SCS_PROVIDER": "cpu", "SCS_WORKERS": str(workers), "SCS_INTRA_OP_THREADS": "1"},
                       server_cores, out / f"workers-{workers}.log")
        try:
            rows[str(workers)] = http_point(server.url, "/classify", bodies, 8 * workers, args.seconds, load_cores)
        finally:
            server.stop()
    return rows


def verdict(results: dict, args) -> list[str]:
    problems = []
    model = results["model"]
    if args.provider == "cuda" and model["provider_used"] != CUDA:
        problems.append(f"asked for CUDA, the session got {model['provider_used']}")
    if model["parity_vs_cpu"]["argmax_changes"]:
        problems.append(f"{model['parity_vs_cpu']['argmax_changes']} argmax changes against the CPU")
    for size, found in model["invariance"].items():
        if found["max_abs_diff"] > contract.TOLERANCE or found["argmax_changes"]:
            problems.append(f"batch invariance at batch {size}: {found}")
    for name, row in results.get("http", {}).items():
        if args.provider == "cuda" and row["provider_reported"] != CUDA:
            problems.append(f"{name}: /v1/model reported {row['provider_reported']}")
        if any(point["errors"] for point in row["points"]):
            problems.append(f"{name}: HTTP errors")
    return problems


def best_batching(http: dict) -> str | None:
    """The batching setting with the most /classify requests/s at the most clients measured."""
    def rps(row: dict) -> float:
        points = [p for p in row["points"] if p["route"] == "/classify"]
        return max(points, key=lambda p: p["clients"])["rps"] if points else 0.0
    return max(http, key=lambda name: rps(http[name])) if http else None


def report(results: dict) -> str:
    model, env = results["model"], results["machine"]
    lines = [f"# Accelerator check: {results['provider_asked']} ({results['date']})", "",
             f"- machine: {', '.join(env.get('gpus') or ['no GPU'])}; CUDA {env.get('cuda')}; onnxruntime "
             f"{env['onnxruntime']} (providers {', '.join(env['available_providers'])}); {env['cpu_cores']} CPU cores",
             f"- provider used by the session: **{model['provider_used']}**",
             f"- parity vs CPU over {model['sentences']} sentences: max abs diff {model['parity_vs_cpu']['max_abs_diff']:.2e}, "
             f"{model['parity_vs_cpu']['argmax_changes']} argmax changes", "",
             "| batch | invariance max abs diff | argmax changes | in-process sentences/s (tokenized) |",
             "|---:|---:|---:|---:|"]
    for size in ("17", "64", "256", "1024"):
        found = model["invariance"][size]
        lines.append(f"| {size} | {found['max_abs_diff']:.2e} | {found['argmax_changes']} | "
                     f"{model['throughput'].get(size, '-')} |")
    lines.append(f"| 1 | - | - | {model['throughput']['1']} |")
    for name, row in results.get("http", {}).items():
        knobs = ", ".join(f"{k} {row['batching'][k]}" for k in ("max_batch_size", "max_batch_tokens", "max_wait_ms"))
        lines += ["", f"HTTP, batching `{name}` ({knobs}); /v1/model says {row['provider_reported']}:",
                  "", "| route | clients | req/s | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {p['route']} | {p['clients']} | {p['rps']:,.0f} | {p['p99_ms']:.1f} | {p['errors']} |"
                  for p in row["points"]]
    if results.get("scaling"):
        lines += ["", "CPU workers (64-text requests, one core per worker):", "", "| workers | sentences/s |",
                  "|---:|---:|"]
        lines += [f"| {w} | {r if isinstance(r, str) else format(round(r['sentences_per_s']), ',')} |"
                  for w, r in results["scaling"].items()]
    if results.get("best_batching"):
        lines += ["", f"Best batching at the most clients: `{results['best_batching']}`"]
    lines += ["", "Problems: " + ("; ".join(results["problems"]) or "none")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loadtest.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "banking77")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput point (default 8)")
    parser.add_argument("--clients", default="64,256", help="HTTP client counts (default 64,256)")
    parser.add_argument("--batching", default=",".join(BATCHINGS), help="batching settings to compare")
    parser.add_argument("--workers", default="1,2,4,8", help="CPU worker counts to measure ('' for none)")
    parser.add_argument("--quick", action="store_true",
                        help="300 sentences, 1 s points (or --seconds if shorter), 8 clients: a rehearsal")
    args = parser.parse_args(argv)
    try:
        args.version_dir = contract.version_folder(args.model_dir)
        texts = read_sentences(args.data)
        args.clients = [int(c) for c in args.clients.split(",") if c]
        args.workers = [int(w) for w in args.workers.split(",") if w]
        args.batching = [b for b in args.batching.split(",") if b]
        unknown = set(args.batching) - set(BATCHINGS)
        if unknown:
            raise ValueError(f"--batching: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BATCHINGS)}")
    except (contract.ArtifactError, ValueError) as error:
        parser.error(str(error))
    if args.quick:
        texts, args.seconds, args.clients = texts[:300], min(args.seconds, 1.0), [8]
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write there ({error.strerror})")
    interrupt_on_signals()
    started = time.time()
    results = {"provider_asked": args.provider, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": machine(), "model": {}, "http": {}, "scaling": {}}

    def measure() -> int:
        results["model"] = model_checks(args, texts)
        print(f"model: {json.dumps(results['model'])}", flush=True)
        results["http"] = http_checks(args, texts, args.out)
        results["scaling"] = scaling(args, texts, args.out) if args.workers else {}
        results["problems"] = verdict(results, args)
        results["best_batching"] = best_batching(results["http"])
        results["seconds"] = round(time.time() - started)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "report.md").write_text(report(results))
        print(report(results))
        return 1 if results["problems"] else 0

    return guarded(measure, (contract.ArtifactError,))


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
