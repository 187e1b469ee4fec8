"""Several worker processes on one port (SCS_WORKERS): one service to clients, metrics summed over workers, one
drain on SIGTERM, one error line for a broken model, and a worker that dies takes the service down."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import psutil
import pytest

from conftest import BROKEN_ARTIFACTS, TEXT, assert_one_line_error, burst_in_background, run_cli
from service.workers import cpus_allowed


def workers_of(svc) -> list[psutil.Process]:
    return [p for p in psutil.Process(svc.process.pid).children() if "spawn_main" in " ".join(p.cmdline())]


def test_the_default_is_the_cpus_this_process_may_use():
    assert 1 <= cpus_allowed() <= len(psutil.Process().cpu_affinity())


@pytest.mark.slow
def test_two_workers_answer_as_one_service_and_sum_their_metrics(service_factory, test_artifact):
    svc = service_factory(test_artifact.parent, WORKERS=2)
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
def test_sigterm_drains_every_worker_and_exits_0(service_factory, test_artifact):
    svc = service_factory(test_artifact.parent, WORKERS=2, MAX_BATCH_SIZE=1)
    sender, results = burst_in_background(svc.url, 16, TEXT)
    deadline = time.monotonic() + 30
    while svc.metric("scs_requests_in_flight") < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    svc.process.send_signal(signal.SIGTERM)
    assert svc.process.wait(60) == 0, svc.log.read_text()[-2000:]
    sender.join(60)
    assert [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results] == [200] * 16
    assert svc.log.read_text().count("stopped: queue drained") == 2


@pytest.mark.slow
def test_a_worker_that_dies_takes_the_service_down(service_factory, test_artifact):
    svc = service_factory(test_artifact.parent, WORKERS=2)
    first, second = workers_of(svc)
    first.kill()
    assert svc.process.wait(30) == 128 + signal.SIGKILL
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
    assert "exited with -9: stopping the others" in svc.log.read_text()


@pytest.mark.slow
def test_a_worker_stopped_behind_the_supervisors_back_exits_3(service_factory, test_artifact):
    """SIGTERM sent to one worker: it drains and exits 0, but the service is no longer whole, so the supervisor
    stops the other and exits 3 (restart me), not 0 and not a made-up 128."""
    svc = service_factory(test_artifact.parent, WORKERS=2)
    first, _ = workers_of(svc)
    deadline = time.monotonic() + 30  # both serving, signal handlers installed (/readyz answered from either)
    while svc.log.read_text().count("Application startup complete") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    assert svc.process.wait(60) == 3, svc.log.read_text()[-2000:]
    assert "exited with 0: stopping the others" in svc.log.read_text()


def test_a_broken_model_is_one_line_with_several_workers(artifact_copy):
    break_it, says = BROKEN_ARTIFACTS["labels.json not a list"]
    break_it(artifact_copy)
    result = run_cli("service", "--model-dir", str(artifact_copy), "--workers", "2")
    assert_one_line_error(result, says)
    assert result.stderr.count("error:") == 1
