"""Version swaps under load: a new version, then a broken one, while clients keep sending; nothing may fail.

    python -m loadtest.swap --old models/banking77/1 --new models/banking77/2 [--seconds 20] [--clients 64]
    python -m loadtest.swap --old models/banking77/1 --new models/banking77/1 --phases churn [--rounds 30]

The service runs with the response cache off (``--cache-bytes``: on, with that bound), so every answer is the
model's: what a swap or a shadow competes with. Two phases, each a fresh ``python -m service`` on a temporary repository holding ``--old`` as version 1 (pinned
to core 0; this generator on core 1), with ``--clients`` closed-loop clients sending 4-text requests for
``--seconds``:
- poll: ``SCS_REPOSITORY_POLL_S=0.5``; at 1/4 of the run ``--new`` is dropped in as version 2 (copied under a
  hidden name, then renamed into place, as ``model_export`` publishes); at 1/2 a broken version 3 (its
  model.onnx cut short) is dropped in the same way.
- load API: the same two drops, each followed by ``POST /v2/repository/models/<name>/load`` (with the API key).
Bars, per phase: every request answered 200; every answer names one version, and each of its four
predictions equals that version's own answer (computed in process from the artifact), so no answer mixes
versions; version 2 serves after its drop and keeps serving after the broken one is refused; the refusal is
counted. Prints p99 latency overall and in the 3 s around each swap; exits 1 when a bar fails.

- churn: ``--rounds`` rounds, each 10 concurrent unload and load calls (alternating) on the model the clients
  send to, then one load; one worker. Answers: 200, or 404 while the model is unloaded. Bars: no other answer (no
  5xx, no transport error); every round the version reports at least its ``model.onnx`` size in
  ``memory_bytes`` (the heap its load holds); the resident memory's peak over the second half of the rounds is
  within ``--max-growth-mb`` of its peak over the first half (a version's memory comes back when it is released).

- shadow: rollouts (README, "Rollouts") under ``--clients`` closed-loop clients, one server, the load API with a
  ``rollout`` parameter each time, ``--old`` serving as version 1:
  1. the live p99 with and without a shadow: ``--segment`` seconds without, then ``--new`` as version 2 in shadow at
     ``share`` 0.1 (no gate) for as long, aborted, then as long without again;
  2. ``--old``'s weights as version 3 under a strict gate (``min_agreement`` 0.99, ``min_sentences``
     ``--shadow-sentences``, share 0.1): promoted;
  3. ``--new`` (another seed) as version 4 under the same gate: refused; then the load call again with
     ``min_agreement`` 0.05 below the agreement it measured: promoted.
  Bars: every request answered 200 and every answer equal to its version's own (no answer from a shadow, none
  mixed), in each run; the shadow-on p99 within ``--max-p99-ratio`` (1.2) of the shadow-off p99 (both stretches
  without pooled); version 3 promoted once it compared ``--shadow-sentences``; version 4 refused on
  ``min_agreement`` and then promoted.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gevent
import httpx
import numpy as np

import contract

from .data import metric, percentile, read_sentences, request_bodies, scrape
from .processes import Parser, Server, free_port, guarded, on_the_load_core, verdict
from .traffic import Traffic

ROOT = Path(__file__).resolve().parent.parent
NAME = "swapped"
KEY = "swap-check-key-0123456789"


def expected(folder: Path, bodies: list[tuple[int, bytes]]) -> list[np.ndarray]:
    """Each body's probabilities from ``folder``'s model, one sentence at a time (no batch to blame)."""
    artifact = contract.check(folder)
    manifest = artifact.manifest
    out = []
    for _, body, _ in bodies:
        texts = json.loads(body)["texts"]
        ids = artifact.encoder.encode(texts)[0]
        feeds = [contract.inputs([s], manifest.pad_id, manifest.input_names) for s in ids]
        out.append(np.concatenate([artifact.session.run(None, feed)[0] for feed in feeds]))
    return out


def publish(source: Path, repository: Path, version: int, broken: bool = False) -> None:
    """Copy a version in under a hidden name, then rename it into place (readers never see half a folder)."""
    staging = repository / NAME / f".staging-{version}"
    shutil.copytree(source, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    if manifest.get("version") != str(version):  # the same weights again, as a later version (not hashed)
        (staging / "manifest.json").write_text(json.dumps(manifest | {"version": str(version)}))
    if broken:
        data = (staging / "model.onnx").read_bytes()
        (staging / "model.onnx").write_bytes(data[: len(data) // 2])
    staging.rename(repository / NAME / str(version))


def phase(mode: str, args, reference: dict[str, list[np.ndarray]], bodies, log: Path) -> dict:
    repository = Path(tempfile.mkdtemp(prefix="swap-repo-"))
    shutil.copytree(args.old, repository / NAME / "1")
    port = free_port()
    env = {"SCS_LOG_LEVEL": "warning", "SCS_PROVIDER": "cpu", "SCS_API_KEY": KEY, "SCS_REQUEST_TIMEOUT_S": "10",
           "SCS_GRPC_PORT": "0", "SCS_CACHE_MAX_BYTES": str(args.cache_bytes)}
    if mode == "poll":
        env["SCS_REPOSITORY_POLL_S"] = "0.5"
    server = Server(f"service ({mode})", [sys.executable, "-m", "service", "--model-dir", str(repository),
                                          "--host", "127.0.0.1", "--port", str(port)], port, env)
    server.start(0, log)
    auth = {"Authorization": f"Bearer {KEY}"}
    events: dict[str, float] = {}
    loads: list[int] = []

    def drop(version: int, broken: bool) -> None:
        events[f"v{version}"] = time.perf_counter()
        publish(args.new if not broken else args.old, repository, version, broken)
        if mode == "api":
            response = httpx.post(f"{server.url}/v2/repository/models/{NAME}/load", headers=auth, timeout=60)
            loads.append(response.status_code)

    try:
        traffic = Traffic(server.url, bodies, connections=args.clients, limit_s=30, keep_answers=True, headers=auth)
        quarter = args.seconds / 4
        swaps = [gevent.spawn_later(quarter, gevent.get_hub().threadpool.apply, drop, (2, False)),
                 gevent.spawn_later(2 * quarter, gevent.get_hub().threadpool.apply, drop, (3, True))]
        start = time.perf_counter()
        records = traffic.closed(args.clients, args.seconds)
        gevent.joinall(swaps, raise_error=True)
        traffic.close()
        time.sleep(1.0 if mode == "poll" else 0)
        samples = scrape(server.url, auth)
        served = httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).json()["models"][0]
    finally:
        server.stop()
        shutil.rmtree(repository, ignore_errors=True)
    by_version: dict[str, int] = {}
    failed = [r for r in records if r.status != "200"]
    checked = answers(records, {v: reference[v] for v in ("1", "2")}, reference["labels"])
    wrong = sum(bad for _, bad in checked.values())
    for version, _ in checked.values():
        by_version[version] = by_version.get(version, 0) + 1
    latencies = [r.done - r.due for r in records if r.status == "200"]
    around = {name: [r.done - r.due for r in records if r.status == "200" and at - 1 <= r.due <= at + 2]
              for name, at in events.items()}
    result = {"mode": mode, "requests": len(records), "failed": len(failed),
              "failed_kinds": sorted({r.status for r in failed}), "answers_by_version": by_version,
              "answers_not_matching_their_version": wrong, "p99_ms": percentile(latencies, 99) * 1e3,
              "p99_around_swap_ms": {name: percentile(values, 99) * 1e3 for name, values in around.items()},
              "load_api_statuses": loads, "load_failures_counted": metric(samples, "scs_model_load_failures_total"),
              "served_at_end": [v["version"] for v in served["versions"]],
              "refused_at_end": [v["version"] for v in served["refused"]], "seconds": time.perf_counter() - start}
    problems = []
    if failed:
        problems.append(f"{len(failed)} requests failed ({', '.join(result['failed_kinds'])})")
    if wrong:
        problems.append(f"{wrong} answers did not match the version they named")
    if not by_version.get("2"):
        problems.append("version 2 never answered")
    if result["served_at_end"] != ["2"] or result["refused_at_end"] != ["3"]:
        problems.append(f"at the end served {result['served_at_end']}, refused {result['refused_at_end']} "
                        "(expected version 2 serving, 3 refused)")
    if result["load_failures_counted"] < 1:
        problems.append("the broken version was not counted in scs_model_load_failures_total")
    if mode == "api" and loads != [200, 400]:
        problems.append(f"load API answered {loads} (expected 200 for the new version, 400 for the broken one)")
    result["problems"] = problems
    return result


def churn(args, bodies, log: Path) -> dict:
    repository = Path(tempfile.mkdtemp(prefix="swap-repo-"))
    shutil.copytree(args.old, repository / NAME / "1")
    port = free_port()
    env = {"SCS_LOG_LEVEL": "warning", "SCS_PROVIDER": "cpu", "SCS_API_KEY": KEY, "SCS_WORKERS": "1",
           "SCS_GRPC_PORT": "0", "SCS_CACHE_MAX_BYTES": str(args.cache_bytes)}
    server = Server("service (churn)", [sys.executable, "-m", "service", "--model-dir", str(repository),
                                        "--host", "127.0.0.1", "--port", str(port)], port, env)
    server.start(0, log)
    auth = {"Authorization": f"Bearer {KEY}"}
    rounds: list[dict] = []

    def call(action: str) -> int:
        return httpx.post(f"{server.url}/v2/repository/models/{NAME}/{action}", headers=auth, timeout=60).status_code

    def churning() -> None:
        pool = gevent.get_hub().threadpool
        for _ in range(args.rounds):
            statuses = [job.get() for job in [pool.spawn(call, "unload" if i % 2 == 0 else "load")
                                              for i in range(10)]]
            statuses.append(call("load"))
            versions = httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).json()["models"][0]["versions"]
            rounds.append({"statuses": statuses, "rss_mb": server.rss_bytes() / 1e6,
                           "memory_bytes": versions[0]["memory_bytes"] if versions else 0})

    try:
        traffic = Traffic(server.url, bodies, connections=args.clients, limit_s=30, headers=auth)
        worker = gevent.spawn(churning)
        records = traffic.closed(args.clients, 3600, until=worker.ready)
        worker.get()
        traffic.close()
    finally:
        server.stop()
        shutil.rmtree(repository, ignore_errors=True)
    statuses = {r.status for r in records}
    failed = [r for r in records if r.status not in ("200", "404")]
    onnx_bytes = (args.old / "model.onnx").stat().st_size
    half = len(rounds) // 2
    result = {"mode": "churn", "rounds": len(rounds), "requests": len(records), "statuses": sorted(statuses),
              "failed": len(failed), "rss_mb_by_round": [round(r["rss_mb"]) for r in rounds],
              "memory_bytes_by_round": [r["memory_bytes"] for r in rounds],
              "rss_growth_mb": max(r["rss_mb"] for r in rounds[half:]) - max(r["rss_mb"] for r in rounds[:half])}
    problems = []
    if failed:
        problems.append(f"{len(failed)} requests failed ({', '.join(sorted({r.status for r in failed}))})")
    if any(r["memory_bytes"] < onnx_bytes for r in rounds):
        problems.append(f"memory_bytes under the model's {onnx_bytes} bytes: {result['memory_bytes_by_round']}")
    if not result["rss_growth_mb"] <= args.max_growth_mb:
        problems.append(f"RSS peaked {result['rss_growth_mb']:.0f} MB higher in the second half of the rounds than "
                        f"in the first (bar: <= {args.max_growth_mb:g})")
    result["problems"] = problems
    return result


def shadow(args, reference: dict[str, list[np.ndarray]], bodies, log: Path) -> dict:
    repository = Path(tempfile.mkdtemp(prefix="swap-repo-"))
    shutil.copytree(args.old, repository / NAME / "1")
    port = free_port()
    env = {"SCS_LOG_LEVEL": "warning", "SCS_PROVIDER": "cpu", "SCS_API_KEY": KEY, "SCS_REQUEST_TIMEOUT_S": "10",
           "SCS_GRPC_PORT": "0", "SCS_CACHE_MAX_BYTES": str(args.cache_bytes), "SCS_WORKERS": "1"}
    server = Server("service (shadow)", [sys.executable, "-m", "service", "--model-dir", str(repository),
                                         "--host", "127.0.0.1", "--port", str(port)], port, env)
    server.start(0, log)
    auth = {"Authorization": f"Bearer {KEY}"}
    marks: dict[str, tuple[float, float]] = {}  # stretch -> (start, end), perf_counter
    reports: dict[str, dict] = {}
    calls: list[tuple[str, int]] = []

    def call(action: str, body: dict | None = None) -> dict:
        response = httpx.post(f"{server.url}/v2/repository/models/{NAME}/{action}", headers=auth, json=body,
                              timeout=120)
        calls.append((action, response.status_code))
        return response.json()

    def report(version: int) -> dict:
        return httpx.get(f"{server.url}/v1/models/{NAME}/versions/{version}/shadow", headers=auth, timeout=10).json()

    def decided(version: int) -> dict:
        deadline = time.perf_counter() + args.gate_timeout + 10
        while time.perf_counter() < deadline:
            found = report(version)
            if found.get("verdict") or found.get("stage") not in ("shadow", "canary"):
                return found
            time.sleep(0.2)
        return report(version)

    def gate(min_agreement: float) -> dict:
        return {"shadow": {"share": 0.1}, "gate": {"min_sentences": args.shadow_sentences,
                                                   "min_agreement": min_agreement, "max_abstention_increase": 0.02,
                                                   "timeout_s": args.gate_timeout}}

    def script() -> None:
        time.sleep(2)  # the clients connect and the first batches settle
        started = time.perf_counter()
        time.sleep(args.segment)
        marks["without shadow"] = (started, time.perf_counter())
        publish(args.new, repository, 2)
        call("load", {"parameters": {"rollout": {"shadow": {"share": 0.1}}}})
        started = time.perf_counter()
        time.sleep(args.segment)
        marks["shadow at 0.1"] = (started, time.perf_counter())
        reports["shadow at 0.1"] = report(2)
        call("abort")
        started = time.perf_counter()
        time.sleep(args.segment)
        marks["without shadow, after"] = (started, time.perf_counter())

        started = time.perf_counter()
        publish(args.old, repository, 3)
        call("load", {"parameters": {"rollout": gate(0.99)}})
        reports["same weights, min_agreement 0.99"] = decided(3)
        marks["same weights"] = (started, time.perf_counter())

        started = time.perf_counter()
        publish(args.new, repository, 4)
        call("load", {"parameters": {"rollout": gate(0.99)}})
        refused = reports["other seed, min_agreement 0.99"] = decided(4)
        bar = round(max(0.0, (refused.get("agreement") or 0.0) - 0.05), 4)
        call("load", {"parameters": {"rollout": gate(bar)}})
        reports[f"other seed, min_agreement {bar}"] = decided(4)
        marks["other seed"] = (started, time.perf_counter())

    try:
        traffic = Traffic(server.url, bodies, connections=args.clients, limit_s=30, keep_answers=True, headers=auth)
        worker = gevent.spawn(gevent.get_hub().threadpool.apply, script)
        records = traffic.closed(args.clients, 3600, until=worker.ready)
        worker.get()
        traffic.close()
        samples = scrape(server.url, auth)
        served = httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).json()["models"][0]
    finally:
        server.stop()
        shutil.rmtree(repository, ignore_errors=True)
    truth = {"1": reference["1"], "2": reference["2"], "3": reference["1"], "4": reference["2"]}
    checked = answers(records, truth, reference["labels"])

    def within(name: str) -> list:
        start, end = marks[name]
        return [r for r in records if start <= r.due <= end]

    def p99(names: list[str]) -> float:
        return percentile([r.done - r.due for name in names for r in within(name) if r.status == "200"], 99) * 1e3

    runs = {name: {"requests": len(within(name)), "failed": sum(r.status != "200" for r in within(name)),
                   "wrong": sum(checked[id(r)][1] for r in within(name) if id(r) in checked)}
            for name in marks}
    off, on = p99(["without shadow", "without shadow, after"]), p99(["shadow at 0.1"])
    overhead = reports["shadow at 0.1"]
    live_sentences = sum(r.sentences for r in within("shadow at 0.1") if r.status == "200")
    result = {"mode": "shadow", "requests": len(records), "failed": sum(r.status != "200" for r in records),
              "failed_kinds": sorted({r.status for r in records if r.status != "200"}),
              "answers_by_version": {v: sum(version == v for version, _ in checked.values()) for v in "1234"},
              "answers_not_matching_their_version": sum(bad for _, bad in checked.values()), "runs": runs,
              "p99_ms": {"without shadow (both stretches)": off, "shadow at 0.1": on}, "p99_ratio": on / off if off
              else None, "shadow_at_0.1": {"compared": overhead["sentences"]["compared"],
                                           "shed": overhead["sentences"]["shed"],
                                           "live_sentences": live_sentences},
              "decisions": {name: {key: found.get(key) for key in ("verdict", "reason", "seconds", "agreement",
                                                                   "probability_shift", "abstention_rate",
                                                                   "model_time", "sentences")}
                            for name, found in reports.items()},
              "calls": calls, "shadow_metrics_compared": metric(samples, "scs_shadow_sentences_total",
                                                                 outcome="compared"),
              "served_at_end": [v["version"] for v in served["versions"]]}
    problems = []
    if result["failed"]:
        problems.append(f"{result['failed']} requests failed ({', '.join(result['failed_kinds'])})")
    if result["answers_not_matching_their_version"]:
        problems.append(f"{result['answers_not_matching_their_version']} answers did not match their version")
    if result["answers_by_version"]["2"]:
        problems.append("version 2, in shadow, answered clients")
    if not result["p99_ratio"] or result["p99_ratio"] > args.max_p99_ratio:
        problems.append(f"p99 with a shadow at 0.1 {on:.1f} ms vs {off:.1f} ms without: ratio "
                        f"{result['p99_ratio'] or 0:.2f} (bar <= {args.max_p99_ratio:g})")
    same = reports["same weights, min_agreement 0.99"]
    if same.get("verdict") != "promoted" or same["sentences"]["compared"] < args.shadow_sentences:
        problems.append(f"the same weights were not promoted after {args.shadow_sentences} sentences: "
                        f"{same.get('verdict')} ({same.get('reason')})")
    other = reports["other seed, min_agreement 0.99"]
    if other.get("verdict") != "refused" or "min_agreement" not in (other.get("reason") or ""):
        problems.append(f"the other seed was not refused on min_agreement: {other.get('verdict')} "
                        f"({other.get('reason')})")
    lenient = [found for name, found in reports.items() if name.startswith("other seed") and found is not other]
    if not lenient or lenient[0].get("verdict") != "promoted" or result["served_at_end"] != ["4"]:
        problems.append(f"the other seed was not promoted under a lower bar: "
                        f"{lenient[0].get('verdict') if lenient else None}, serving {result['served_at_end']}")
    result["problems"] = problems
    return result


def answers(records: list, truth: dict[str, list[np.ndarray]], labels: list[str]) -> dict[int, tuple[str, int]]:
    """Each answered record (by id): the version its answer names, and 1 when the answer is not that version's own
    (a mixed or wrong answer), else 0."""
    out = {}
    for record in records:
        if record.status != "200":
            continue
        answer = json.loads(record.body)
        expected = truth.get(answer["version"])
        out[id(record)] = (answer["version"],
                           int(expected is None or not matches(answer, expected[record.index], labels)))
    return out


def matches(answer: dict, expected: np.ndarray, labels: list[str]) -> bool:
    """Every prediction of ``answer`` is the reference's: same label, score within 1e-5."""
    return len(answer["predictions"]) == expected.shape[0] and all(
        p["label"] == labels[int(expected[i].argmax())] and abs(p["score"] - float(expected[i].max())) <= 1e-5
        for i, p in enumerate(answer["predictions"]))


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loadtest.swap", description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the version folder served first")
    parser.add_argument("--new", type=Path, required=True, help="the version folder dropped in (other weights)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "test.csv")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--phases", default="poll,api", help="comma-separated: poll, api, churn, shadow")
    parser.add_argument("--rounds", type=int, default=30, help="churn: rounds of load/unload calls (default 30)")
    parser.add_argument("--max-growth-mb", type=float, default=20.0, help="churn: RSS growth bar (default 20)")
    parser.add_argument("--segment", type=float, default=10.0, help="shadow: seconds of each p99 stretch (default 10)")
    parser.add_argument("--shadow-sentences", type=int, default=2000, help="shadow: the gate's min_sentences "
                        "(default 2000)")
    parser.add_argument("--gate-timeout", type=float, default=120.0, help="shadow: the gate's timeout_s (default 120)")
    parser.add_argument("--max-p99-ratio", type=float, default=1.2, help="shadow: p99 bar, shadow on / off (1.2)")
    parser.add_argument("--cache-bytes", type=int, default=0, help="the service's SCS_CACHE_MAX_BYTES (default 0: "
                        "off, so every answer comes from the model, as in the other reliability runs)")
    parser.add_argument("--log", type=Path, help="server log (default: a temporary file)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - {"poll", "api", "churn", "shadow"}:
        parser.error(f"--phases: choose from poll, api, churn, shadow (got {args.phases!r})")
    if args.seconds < 4 or args.clients < 1 or args.rounds < 2:
        parser.error("--seconds must be >= 4, --clients >= 1 and --rounds >= 2")
    if args.segment < 1 or args.shadow_sentences < 1 or args.gate_timeout <= 0 or args.max_p99_ratio <= 0:
        parser.error("--segment must be >= 1, --shadow-sentences >= 1, --gate-timeout and --max-p99-ratio > 0")
    try:
        old, new = contract.read(args.old), contract.read(args.new)
        sentences = read_sentences(args.data)
    except (contract.ArtifactError, ValueError) as error:
        parser.error(str(error))
    if old.labels != new.labels:
        parser.error("--old and --new must have the same labels (versions of one model)")
    on_the_load_core()
    bodies = request_bodies(sentences, texts=4, count=200)
    reference = {"1": expected(args.old, bodies), "2": expected(args.new, bodies), "labels": old.labels}
    log = args.log or Path(tempfile.mkdtemp(prefix="swap-")) / "service.log"
    results = []

    def measure() -> int:
        for mode in phases:
            if mode == "shadow":
                result = shadow(args, reference, bodies, log)
                results.append(result)
                print(f"shadow: {result['requests']:,} requests, {result['failed']} failed, "
                      f"{result['answers_not_matching_their_version']} not matching their version, answers by "
                      f"version {result['answers_by_version']}; p99 without a shadow "
                      f"{result['p99_ms']['without shadow (both stretches)']:.1f} ms, with one at 0.1 "
                      f"{result['p99_ms']['shadow at 0.1']:.1f} ms (x{result['p99_ratio'] or 0:.2f}); "
                      + "; ".join(f"{name}: {found['verdict']} after {found['sentences']['compared']} sentences, "
                                  f"agreement {found['agreement']}" for name, found in result["decisions"].items()
                                  if found.get("sentences"))
                      + (": PASS" if not result["problems"] else ": FAIL"), flush=True)
                continue
            if mode == "churn":
                result = churn(args, bodies, log)
                results.append(result)
                print(f"churn: {result['rounds']} rounds, {result['requests']:,} requests ({result['statuses']}), "
                      f"{result['failed']} failed, RSS by round {result['rss_mb_by_round']} MB, memory_bytes "
                      f"{min(result['memory_bytes_by_round'])}-{max(result['memory_bytes_by_round'])}"
                      + (": PASS" if not result["problems"] else ": FAIL"), flush=True)
                continue
            result = phase(mode, args, reference, bodies, log)
            results.append(result)
            print(f"{mode}: {result['requests']:,} requests, {result['failed']} failed, answers by version "
                  f"{result['answers_by_version']}, p99 {result['p99_ms']:.1f} ms, around the swaps "
                  + ", ".join(f"{k}: {v:.1f} ms" for k, v in result["p99_around_swap_ms"].items())
                  + (": PASS" if not result["problems"] else ": FAIL"), flush=True)
        print(json.dumps({"seconds": args.seconds, "clients": args.clients, "results": results}))
        return verdict([f"{r['mode']}: {p}" for r in results for p in r["problems"]])

    return guarded(measure)

if __name__ == "__main__":
    sys.exit(main())
