-- wrk script for benches/proxy.sh and ab.py: POST a ~1 KB chat completion, print one JSON
-- summary line. The body comes from the file named by BENCH_BODY_FILE (written by proxy.sh);
-- with BENCH_SSE_EVENTS=N it is streamed, as N events.
local f = assert(io.open(assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE not set"), "rb"))
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = f:read("*a")
local events = os.getenv("BENCH_SSE_EVENTS")
if events then
  wrk.body = wrk.body:gsub("^{", '{"stream":true,', 1)
  wrk.headers["x-emu-stream-events"] = events
end
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-0000000000000000"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},"latency_us":{"p50":%d,"p99":%d,"p99.9":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
