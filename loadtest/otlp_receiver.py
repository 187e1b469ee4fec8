"""A minimal OTLP/HTTP trace receiver on 127.0.0.1: it decodes every ``POST /v1/traces`` with opentelemetry-proto
and keeps the spans, for the tracing tests and the tracing benchmark (a live collector that costs the server
nothing it would not pay a real one).

    python -m loadtest.otlp_receiver --port 4318        # GET /spans: how many spans it has received
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class Receiver:
    """The server and what it received: every span, decoded, in arrival order."""

    def __init__(self, port: int = 0, keep: bool = True) -> None:
        self.spans: list[Span] = []  # with ``keep``; else only counted
        self.count = self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    return self._answer(404, b"")
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                spans = [span for resource in message.resource_spans for scope in resource.scope_spans
                         for span in scope.spans]
                with receiver.lock:
                    if keep:
                        receiver.spans += spans
                    receiver.count += len(spans)
                    receiver.requests += 1
                self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/spans":
                    with receiver.lock:
                        body = json.dumps({"spans": receiver.count, "requests": receiver.requests}).encode()
                    return self._answer(200, body, "application/json")
                self._answer(200 if self.path == "/readyz" else 404, b"")

            def _answer(self, status: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.otlp_receiver", description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    receiver = Receiver(args.port, keep=False)
    try:
        receiver.server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
