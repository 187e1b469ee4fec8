"""SIGTERM: readiness turns 503, every accepted request is answered, then the process exits."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest

LONG = "please tell me why my card payment was declined at the shop again today " * 3


@pytest.mark.slow
@pytest.mark.parametrize("drain_seconds", [0, 0.5])
def test_sigterm_mid_burst_loses_no_accepted_request(service_factory, test_artifact, drain_seconds):
    svc = service_factory(test_artifact, MAX_BATCH_SIZE=1, DRAIN_SECONDS=drain_seconds)
    bodies = [{"texts": [f"{LONG} {i} {j}" for j in range(64)]} for i in range(64)]
    results: list = []

    async def burst() -> list:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=svc.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(client.post("/classify", json=b) for b in bodies), return_exceptions=True)

    sender = threading.Thread(target=lambda: results.extend(asyncio.run(burst())))
    sender.start()
    deadline = time.monotonic() + 30
    while svc.metric("scs_requests_in_flight") < 65 and time.monotonic() < deadline:  # 64 + this scrape
        time.sleep(0.01)
    queued = svc.metric("scs_queue_depth")
    assert queued > 0, "the burst finished before SIGTERM: nothing was tested"
    svc.process.send_signal(signal.SIGTERM)
    if drain_seconds:
        ready = httpx.get(f"{svc.url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        assert ready.headers["retry-after"] == "1"
    sender.join(120)
    assert not sender.is_alive()
    errors = [r for r in results if not isinstance(r, httpx.Response)]
    assert not errors, errors[:3]
    assert [r.status_code for r in results] == [200] * 64
    assert all(len(r.json()["predictions"]) == 64 for r in results)
    assert svc.process.wait(60) in (0, -signal.SIGTERM)
    log = svc.log.read_text()
    assert '"message":"draining"' in log and "stopped: queue drained" in log
