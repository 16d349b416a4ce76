"""What the official openai SDK does with ezgate's 429s (docs/rate-limits.md, "Clients").

    python sdk_retries.py BASE_URL      # e.g. http://127.0.0.1:PORT/v1

The gateway runs two policies: `fast` (2/s, burst 1) on GET /v1/models and `slow` (1/min)
on GET /v1/files. Prints one JSON line of what the client saw; any exception it did not
expect fails the calling test.
"""
import json
import sys

import openai

base = sys.argv[1]
seen = {}

# By default the SDK waits through ezgate's 429s: back-to-back listings outrun the 2/s pace,
# the SDK sleeps retry-after-ms and sends again, and every call succeeds.
client = openai.OpenAI(base_url=base, api_key="sk-test")
retries = []
for _ in range(20):
    raw = client.models.with_raw_response.list()
    raw.parse()
    retries.append(raw.retries_taken)
    if max(retries) > 0:
        break
seen["default_max_retries"] = client.max_retries
seen["default_retries"] = retries

# Opting out: a latency-sensitive caller gets the 429 at once.
try:
    client.files.with_raw_response.list(extra_headers={"x-request-id": "sdk-first"})
except openai.APIStatusError as e:
    # Whatever the emulator answers /v1/files, the request took the policy's one slot.
    seen["first_status"] = e.status_code
for rid, c in [
    ("sdk-per-request", client.with_options(max_retries=0)),
    ("sdk-client", openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0)),
]:
    try:
        c.files.with_raw_response.list(extra_headers={"x-request-id": rid})
        seen[rid] = "admitted"
    except openai.RateLimitError as e:
        seen[rid] = {
            "status": e.status_code,
            "code": e.code,
            "retry_after_ms": e.response.headers.get("retry-after-ms"),
        }
print(json.dumps(seen))
