"""An OTLP/HTTP trace receiver for ezgate's tracing tests.

Listens on 127.0.0.1 (a free port), prints `listening <port>`, then one JSON line per span
it receives on POST /v1/traces (protobuf), with the span's ids, name, kind, attributes,
events, status and resource attributes, and the request's Content-Type. Exits when its
stdin closes (the test ended).
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        lines = []
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(),
                                "trace_state": s.trace_state,
                                "name": s.name,
                                "kind": s.kind,
                                "attributes": attributes(s.attributes),
                                "events": [e.name for e in s.events],
                                "status_code": s.status.code,
                                "status_message": s.status.message,
                                "scope": ss.scope.name,
                                "resource": resource,
                                "content_type": self.headers.get("Content-Type"),
                                "raw": body.hex(),
                            }
                        )
                    )
        with LOCK:
            for line in lines:
                print(line, flush=True)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
