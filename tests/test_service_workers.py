"""Several worker processes on one port (SCS_WORKERS): one service to clients, metrics summed over workers, a drain
on SIGTERM that loses no request, a worker that dies replaced while the others serve, a crash loop that stops the
service, one error line for a broken model."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import psutil
import pytest

from conftest import BROKEN_ARTIFACTS, TEXT, assert_one_line_error, run_cli, wait_for
from service.workers import cpus_allowed


def workers_of(svc) -> list[psutil.Process]:
    """The supervisor's live workers (one that just exited may be a zombie until the supervisor reaps it)."""
    def is_worker(process: psutil.Process) -> bool:
        try:
            return "spawn_main" in " ".join(process.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            return False
    return [p for p in psutil.Process(svc.process.pid).children() if is_worker(p)]


def test_the_default_is_the_cpus_this_process_may_use():
    assert 1 <= cpus_allowed() <= len(psutil.Process().cpu_affinity())


@pytest.mark.slow
def test_two_workers_answer_as_one_service_and_sum_their_metrics(service_factory, test_artifact):
    svc = service_factory(test_artifact.parent, WORKERS=2, CACHE_MAX_BYTES=0)  # every sentence runs
    assert len(workers_of(svc)) == 2
    before = svc.metric("scs_requests_total", endpoint="/classify", status="200")

    async def many() -> list[int]:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30,
                                     limits=httpx.Limits(max_connections=16)) as client:
            return [r.status_code for r in await asyncio.gather(
                *(client.post("/classify", json={"texts": [TEXT, f"card {i}"]}) for i in range(200)))]

    assert asyncio.run(many()) == [200] * 200
    time.sleep(1)  # gauges refresh twice a second
    assert svc.metric("scs_requests_total", endpoint="/classify", status="200") == before + 200
    assert svc.metric("scs_batch_size_sentences_sum") >= 400  # both workers' batches, summed
    assert svc.metric("scs_requests_in_flight") <= 1 and svc.metric("scs_queue_depth") == 0
    control = httpx.post(f"{svc.url}/v2/repository/models/test-model/unload")
    assert control.status_code in (403, 409)  # no key: refused either way; with a key, 409 (see below)


@pytest.mark.slow
def test_the_load_api_says_to_poll_with_several_workers(service_factory, test_artifact):
    svc = service_factory(test_artifact.parent, WORKERS=2, ALLOW_REPOSITORY_CONTROL="true")
    refused = httpx.post(f"{svc.url}/v2/repository/models/test-model/unload")
    assert refused.status_code == 409 and "SCS_REPOSITORY_POLL_S" in refused.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1])
def test_sigterm_under_keep_alive_load_loses_nothing(test_artifact, tmp_path, workers):
    """32 keep-alive clients and a fresh-connection prober under continuous load, then SIGTERM: every request sent
    is answered (or refused at connect once the port closed), and the service exits 0 (``loadtest.signals``)."""
    result = run_cli("loadtest.signals", "stop", "--workers", str(workers), "--model-dir", str(test_artifact.parent),
                     "--clients", "32", "--log", str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    run = json.loads(result.stdout.splitlines()[0])
    assert run["lost"] == 0 and run["exit_code"] == 0, run
    counts = run["after_signal"]  # requests sent after the signal: answered during the drain, then refused
    assert counts.get("answered", 0) > 0 and counts.get("refused", 0) > 0, run
    log = (tmp_path / "stop-1.log").read_text()
    assert log.count("stopped: queue drained") == workers and "Traceback" not in log


@pytest.mark.slow
def test_a_killed_worker_is_replaced_while_the_other_serves(test_artifact, tmp_path):
    """SIGKILL one of two workers under 32 clients: only its own requests fail, the other answers throughout,
    a replacement answers within 10 s, and the replacement is counted."""
    result = run_cli("loadtest.signals", "kill", "--model-dir", str(test_artifact.parent), "--clients", "32",
                     "--after", "8", "--log", str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    run = json.loads(result.stdout.splitlines()[0])
    assert run["lost"] <= run["killed_worker_connections"] and run["longest_gap_s"] <= 1.0, run
    assert run["replacement_answered_after_s"] is not None and run["replacement_answered_after_s"] <= 10, run
    log = (tmp_path / "kill-1.log").read_text()
    assert '"message":"worker died: replacing it"' in log and '"cause":"SIGKILL"' in log


@pytest.mark.slow
def test_a_worker_stopped_behind_the_supervisors_back_is_replaced(service_factory, test_artifact):
    """SIGTERM sent to one worker: it drains and exits 0, but nobody asked the supervisor, so it starts another."""
    svc = service_factory(test_artifact.parent, WORKERS=2)
    first, second = workers_of(svc)
    wait_for(lambda: svc.log.read_text().count('"message":"ready"') >= 2)  # both serving, signals taken over
    first.send_signal(signal.SIGTERM)
    assert wait_for(lambda: len(workers_of(svc)) == 2 and first.pid not in [p.pid for p in workers_of(svc)])
    assert wait_for(lambda: svc.metric("scs_worker_replacements_total", cause="exit_0") == 1)
    assert httpx.post(f"{svc.url}/classify", json={"text": TEXT}).status_code == 200
    assert svc.stop() == 0 and second.pid not in [p.pid for p in psutil.process_iter()]


@pytest.mark.slow
def test_a_crash_loop_stops_the_service_with_3(service_factory, artifact_copy):
    """Workers that keep dying (the model broke on disk, so every replacement refuses to start) stop the service
    after SCS_WORKER_CRASH_LIMIT deaths within the window: exit 3 and one line saying why."""
    svc = service_factory(artifact_copy, WORKERS=2, WORKER_CRASH_LIMIT=3)
    (artifact_copy / "labels.json").write_text("[]")
    workers_of(svc)[0].kill()
    assert svc.process.wait(60) == 3, svc.log.read_text()[-3000:]
    last = svc.log.read_text().strip().splitlines()[-1]
    assert last.startswith("error: 3 workers died within 60 s") and "crash loop" in last, last


def test_a_broken_model_is_one_line_with_several_workers(artifact_copy):
    break_it, says = BROKEN_ARTIFACTS["labels.json not a list"]
    break_it(artifact_copy)
    result = run_cli("service", "--model-dir", str(artifact_copy), "--workers", "2")
    assert_one_line_error(result, says)
    assert result.stderr.count("error:") == 1
