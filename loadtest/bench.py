"""Benchmark harness: the service beside its references, measured in one run on this machine.

    python -m loadtest.bench                       # what `make bench` runs (about 5 minutes)
    python -m loadtest.bench --configs constant --concurrency 1,8 --seconds 2 --out /tmp/b --benchmarks none

Each configuration is a command that starts a server on 127.0.0.1 plus a readiness URL. The harness starts
it pinned to one core (``taskset -c 0``), puts the load generator on the other core, warms up, then measures
closed-loop clients at each concurrency and an open loop at fixed arrival rates (fractions of the first
configuration's peak). It also measures the in-process onnxruntime ceiling. Outputs: ``bench.json``,
``bench.md`` and ``bench.png`` in ``--out``, and the section between the markers in BENCHMARKS.md.
Every process it starts is stopped when it ends, fails or is interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import generators, report
from .processes import TASKSET, Server, core_busy_seconds, free_port, stop_all

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"batching": "service, batching on (defaults)", "no-batching": "service, batching off (max batch 1)",
         "naive-torch": "naive torch FastAPI (batch = request)", "constant": "constant-answer FastAPI (HTTP ceiling)"}
BATCH_OFF_ENV = {"SCS_MAX_BATCH_SIZE": "1"}  # the service's setting for "one sentence per model run"
SERVER_ENV = {"SCS_INTRA_OP_THREADS": "1", "SCS_LOG_LEVEL": "warning"}  # one core: one onnxruntime thread


def resolve_model(path: Path) -> tuple[Path, Path]:
    """(folder the service is given, version folder the baselines read): ``models/x`` or ``models/x/1``."""
    if (path / "manifest.json").is_file():
        return (path.parent if path.name.isdigit() else path), path
    versions = sorted((p for p in path.glob("*") if p.name.isdigit() and (p / "manifest.json").is_file()),
                      key=lambda p: int(p.name))
    if not versions:
        raise ValueError(f"{path}: no version folder with a manifest.json (expected e.g. {path}/1)")
    return path, versions[-1]


def default_model() -> Path:
    for candidate in (ROOT / "models" / "banking77", ROOT / "artifacts" / "test-model"):
        if candidate.is_dir():
            return candidate
    return ROOT / "models" / "banking77"


def commands(service_dir: Path, version_dir: Path, port: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    python, where = sys.executable, ["--host", "127.0.0.1", "--port", str(port)]
    service = [python, "-m", "service", *where, "--model-dir", str(service_dir)]
    return {
        "batching": (service, dict(SERVER_ENV)),
        "no-batching": (service, {**SERVER_ENV, **BATCH_OFF_ENV}),
        "naive-torch": ([python, "-m", "loadtest.baselines.naive_torch", *where, "--model-dir", str(version_dir)], {}),
        "constant": ([python, "-m", "loadtest.baselines.constant_app", *where, "--model-dir", str(version_dir)], {}),
    }


def model_ceiling(version_dir: Path, sentences: list[str], core: int | None, seconds: float,
                  batch_sizes=(1, 8, 32, 64, 128, 256)) -> dict:
    """Sentences/s of onnxruntime alone, 1 thread, pinned like the servers; batches of similar length."""
    import random

    from tokenizers import Tokenizer

    from model_export.bench import sentences_per_second
    from model_export.export import run_batch, session
    from model_export.tokenizer import encode

    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    sequences = encode(Tokenizer.from_file(str(version_dir / "tokenizer.json")), sentences, manifest["max_length"])
    random.Random(0).shuffle(sequences)
    before = os.sched_getaffinity(0)
    if core is not None and core in before:
        os.sched_setaffinity(0, {core})
    try:
        sess = session(version_dir / "model.onnx", threads=1)
        run_batch(sess, sequences[:64], manifest["pad_id"])  # warm up
        rows = [{"batch": size, "sentences_per_s": sentences_per_second(sess, sequences, manifest["pad_id"], size,
                                                                        size > 1, seconds)}
                for size in batch_sizes]
    finally:
        os.sched_setaffinity(0, before)
    return {"rows": rows, "best": max(rows, key=lambda r: r["sentences_per_s"])}


def read_sentences(path: Path, column: str = "text") -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no column {column!r}")
        sentences = [row[column].strip() for row in reader if (row[column] or "").strip()]
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences


def measure(server: Server, generator: str, load: float, seconds: float, args, mode: str = "closed") -> dict:
    """One point, measured again once if other work took more than ``args.max_other_cpu`` of the server's core."""
    for attempt in (1, 2):
        row = _measure_once(server, generator, load, seconds, args, mode)
        row["attempts"] = attempt
        if row.get("other_cpu") is None or row["other_cpu"] <= args.max_other_cpu:
            break
        say(f"{server.name}: {row['other_cpu']:.2f} of core {args.server_core} went to other processes; "
            + ("measuring again" if attempt == 1 else "keeping this point, marked"))
    return row


def _measure_once(server: Server, generator: str, load: float, seconds: float, args, mode: str) -> dict:
    """Run the generator against ``server``; note the server's CPU use, and other processes' use of its core."""
    watched = args.server_core if args.pinned else None
    cpu, core, started = server.cpu_seconds(), core_busy_seconds(watched), time.monotonic()
    if mode == "open":
        row = generators.open_loop(server.url, load, seconds, args.bodies_path, args.load_core)
    elif generator == "wrk":
        row = generators.wrk(server.url, int(load), seconds, args.bodies_path, args.load_core)
    else:
        row = generators.locust(server.url, int(load), seconds, (args.multi_percent, args.multi_max), args.data,
                                args.load_core)
    elapsed = time.monotonic() - started
    server_cpu = (server.cpu_seconds() - cpu) / elapsed
    core_after = core_busy_seconds(watched)
    row.update(config=server.name, mode=mode, generator="open loop" if mode == "open" else generator,
               load=load if mode == "open" else int(load), server_cpu=server_cpu,
               other_cpu=None if core is None or core_after is None
               else max(0.0, (core_after - core) / elapsed - server_cpu))
    return row


def run_config(name: str, argv: list[str], env: dict, args, run: dict, log_dir: Path) -> None:
    server = Server(name, argv, int(argv[argv.index("--port") + 1]), env)
    say(f"{name}: starting `{' '.join(argv[1:])}`")
    try:
        server.start(args.server_core, log_dir / f"{name}.log")
        say(f"{name}: ready on {server.url} (pid {server.process.pid})")
        if args.warmup > 0:
            _measure_once(server, args.generator, 8, args.warmup, args, "closed")
        for level in args.concurrency:
            point = measure(server, args.generator, level, args.seconds, args)
            run["points"].append(point)
            say(f"{name}: c={level:<4} {point['rps']:8.0f} req/s {point['sentences_per_s']:8.0f} sentences/s "
                f"p50 {point['p50_ms']:7.1f} p99 {point['p99_ms']:7.1f} ms errors {point['errors']} "
                f"(server CPU {point['server_cpu']:.2f}, others on its core {_share(point['other_cpu'])}, "
                f"load CPU {point['load_cpu']:.2f})")
        if name == "constant" and args.generator == "wrk" and args.generator_check:
            level = max(args.concurrency)
            point = measure(server, "locust", level, args.seconds, args, mode="check")
            run["points"].append(point)
            say(f"{name}: generator check, Locust at c={level}: {point['rps']:.0f} req/s "
                f"(load CPU {point['load_cpu']:.2f})")
        for rate in open_rates(run, args):
            point = measure(server, "open", rate, args.open_seconds, args, mode="open")
            run["points"].append(point)
            say(f"{name}: open {rate:7.0f} req/s -> {point['rps']:7.0f} answered, p50 {point['p50_ms']:7.1f} "
                f"p99 {point['p99_ms']:7.1f} ms errors {point['errors']} (lag {point['lag_ms']:.0f} ms)")
    except Exception as error:  # one broken configuration must not cost the others their figures
        run["skipped"][name] = str(error)[:300]
        say(f"{name}: not measured: {error}")
    finally:
        server.stop()


def open_rates(run: dict, args) -> list[float]:
    """Arrival rates for the open loop: fractions of the first measured configuration's peak requests/s."""
    if not args.open_fractions:
        return []
    if "open_reference" not in run:
        best = report.peak(run["points"], run["points"][0]["config"]) if run["points"] else None
        if best is None:
            return []
        run["open_reference"] = {"config": best["config"], "rps": best["rps"]}
    return [round(fraction * run["open_reference"]["rps"], 1) for fraction in args.open_fractions]


def machine(args, service_dir: Path, version_dir: Path) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = ["onnxruntime", "fastapi", "uvicorn", "tokenizers", "torch", "locust", "geventhttpclient"]
    versions = [f"Python {platform.python_version()}"]
    for package in packages:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    code = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    if code.returncode == 0:
        versions.append(f"project {code.stdout.strip()}")
    if args.generator == "wrk":
        probe = subprocess.run([generators.WRK, "--version"], capture_output=True, text=True)
        versions.append((probe.stdout + probe.stderr).split("Copyright")[0].strip())
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    config = manifest.get("training", {}).get("config", {})
    pinning = (f"servers pinned to core {args.server_core} and load to core {args.load_core} with taskset"
               if args.pinned else "NOT pinned (taskset missing or too few cores): servers and load share the CPUs")
    mean = f"{args.mean_sentences:.2f}"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
        "pinning": pinning, "versions": ", ".join(versions),
        "model": f"{service_dir.name} v{manifest.get('version')} ({version_dir.relative_to(ROOT) if version_dir.is_relative_to(ROOT) else version_dir}; "
                 f"embedding {config.get('embedding_dim', '?')}, hidden {config.get('hidden_size', '?')}, "
                 f"{manifest.get('num_classes')} classes)",
        "mix": f"{100 - args.multi_percent}% one text, {args.multi_percent}% 2-{args.multi_max} texts "
               f"({mean} sentences per request on average), sentences from {args.data.name}",
        "generator": ("wrk, 1 thread, closed loop (one connection per client), 30 s timeout" if args.generator == "wrk"
                      else "Locust headless, one process, FastHttpUser (wrk not installed)")
                     + f"; open loop: loadtest/openloop.py (geventhttpclient); {args.seconds:g} s per point, "
                       f"{args.open_seconds:g} s per open-loop rate, {args.warmup:g} s warm-up",
        "command": "python -m loadtest.bench" + "".join(f" {a}" for a in sys.argv[1:]),
        "max_other_cpu": args.max_other_cpu,
    }


def say(message: str) -> None:
    print(message, flush=True)


def _numbers(kind, text: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model folder (models/x) or version folder (models/x/1); default: models/banking77")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv",
                        help="CSV with a 'text' column: the sentences sent (default: Banking77 test split)")
    parser.add_argument("--configs", default="batching,no-batching,naive-torch,constant",
                        help=f"comma-separated, in order, from: {', '.join(NAMES)}")
    parser.add_argument("--concurrency", type=lambda t: _numbers(int, t), default=[1, 8, 32, 64, 128],
                        help="closed-loop client counts (default 1,8,32,64,128)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per closed-loop point (default 8)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per configuration (default 3)")
    parser.add_argument("--open-fractions", type=lambda t: _numbers(float, t), default=[0.25, 0.5, 0.75],
                        help="open-loop rates as fractions of the first configuration's peak req/s")
    parser.add_argument("--no-open", dest="open_fractions", action="store_const", const=[], help="skip the open loop")
    parser.add_argument("--open-seconds", type=float, default=6.0, help="seconds per open-loop rate (default 6)")
    parser.add_argument("--generator", choices=["auto", "wrk", "locust"], default="auto",
                        help="closed-loop generator (auto: wrk when installed, else Locust)")
    parser.add_argument("--no-generator-check", dest="generator_check", action="store_false",
                        help="skip the Locust-vs-wrk run against the constant app")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the onnxruntime ceiling")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="seconds per ceiling batch size")
    parser.add_argument("--multi-percent", type=int, default=20, help="share of multi-text requests (default 20)")
    parser.add_argument("--multi-max", type=int, default=8, help="most texts in a multi-text request (default 8)")
    parser.add_argument("--max-other-cpu", type=float, default=0.1,
                        help="measure a point again when other processes used more than this share of the server "
                             "core during it (default 0.1)")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results", help="where results go")
    parser.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"),
                        help="Markdown file whose marked section gets the report ('none' to leave it)")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in NAMES]
    if unknown or not configs:
        parser.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(NAMES)}")
    args.configs = configs
    if args.seconds <= 0 or args.open_seconds <= 0 or args.warmup < 0 or args.ceiling_seconds <= 0:
        parser.error("--seconds, --open-seconds and --ceiling-seconds must be > 0, --warmup >= 0")
    if not 0 <= args.multi_percent <= 100 or args.multi_max < 2:
        parser.error("--multi-percent must be 0-100 and --multi-max >= 2")
    if args.generator == "auto":
        args.generator = "wrk" if generators.WRK else "locust"
    if args.generator == "wrk" and not generators.WRK:
        parser.error("--generator wrk: wrk is not installed (apt-get install -y wrk, or `make bench-tools`)")
    if not args.data.is_file():
        parser.error(f"--data: {args.data} not found")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        service_dir, version_dir = resolve_model(args.model_dir or default_model())
        sentences = read_sentences(args.data)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler (measured: CI run with `&` left Ctrl-C without effect).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    args.bodies_path = args.out / "logs" / "bodies.tsv"
    args.mean_sentences = generators.write_bodies(sentences, args.bodies_path, args.multi_percent, args.multi_max)
    run = {"configs": args.configs, "names": NAMES, "points": [], "skipped": {}, "commands": {}}
    args.pinned = TASKSET is not None and (os.cpu_count() or 1) > max(args.server_core, args.load_core)
    if not args.pinned:
        say("taskset missing or too few cores: servers and load generator are NOT pinned to separate cores")
    started, load_before = time.monotonic(), _load_average()
    try:
        if args.ceiling:
            say(f"model ceiling: onnxruntime in-process on core {args.server_core}, {version_dir}")
            run["ceiling"] = model_ceiling(version_dir, sentences, args.server_core, args.ceiling_seconds)
            for row in run["ceiling"]["rows"]:
                say(f"  batch {row['batch']:>4}: {row['sentences_per_s']:8.0f} sentences/s")
        if args.pinned:
            os.sched_setaffinity(0, {args.load_core})  # the harness itself stays off the server's core
        for name in args.configs:
            argv_, env = commands(service_dir, version_dir, free_port())[name]
            run["commands"][name] = " ".join([f"{k}={v}" for k, v in env.items()] + ["python", *argv_[1:]]).replace(
                str(ROOT) + "/", "")
            run_config(name, argv_, env, args, run, log_dir)
    except KeyboardInterrupt:
        say("interrupted: stopping every process started")
        return 130
    finally:
        stop_all()
    run["meta"] = machine(args, service_dir, version_dir)
    run["meta"]["seconds"] = round(time.monotonic() - started)
    run["meta"]["load_average"] = f"{load_before} before the run, {_load_average()} after it"
    write_outputs(run, args)
    return 0 if run["points"] else 1


def write_outputs(run: dict, args) -> None:
    for point in run["points"]:
        for key, value in list(point.items()):
            if isinstance(value, float):
                point[key] = round(value, 3)
    (args.out / "bench.json").write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    report.plot(run, args.out / "bench.png")
    (args.out / "bench.md").write_text(report.markdown(run, "bench.png"), encoding="utf-8")
    say("")
    say(report.markdown(run, plot_name=None))
    if args.benchmarks != "none":
        target = Path(args.benchmarks)
        relative = os.path.relpath(args.out / "bench.png", target.resolve().parent)
        report.update_benchmarks(target, report.markdown(run, relative))
        say(f"wrote {args.out}/bench.{{json,md,png}} and the report section of {target}")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _load_average() -> str:
    """The 1-minute load average: how busy the machine was with other work (it is shared)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
