"""A realtime session through ezgate with the official openai SDK's realtime client.

    python sdk_realtime.py BASE_URL      # e.g. http://127.0.0.1:PORT/v1

Prints one JSON line of what the client saw; any exception fails the calling test.
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0)
seen = {}
with client.realtime.connect(model="gpt-realtime", max_retries=0) as conn:
    for event in conn:
        if event.type == "session.created":
            seen["model"] = event.session.model
            break
    conn.response.create()
    text = ""
    for event in conn:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.done":
            seen["output_tokens"] = event.response.usage.output_tokens
            break
    seen["text"] = text

print(json.dumps(seen))
