#!/usr/bin/env python3
"""benches/otlp_sink.py PORT — an OTLP/HTTP collector that accepts every export and keeps nothing.

For measuring what recording spans costs ezgate (`[tracing]` with `sample_ratio = 1.0`)
without a real collector's CPU on the machine: it reads each request's body and answers
200 with an empty ExportTraceServiceResponse. Listens on 127.0.0.1 only; stop it with Ctrl-C
or a signal.
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
