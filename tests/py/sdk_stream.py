"""Streams through ezgate with the official openai SDK, the way applications do.

    python sdk_stream.py BASE_URL      # e.g. http://127.0.0.1:PORT/v1

Prints one JSON line of what the client saw; any exception fails the calling test.
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0)
messages = [{"role": "user", "content": "Say hello to the gateway tests."}]
seen = {}

# The commonest loop: every chunk has a choice.
stream = client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
text, chunks = "", 0
for chunk in stream:
    chunks += 1
    text += chunk.choices[0].delta.content or ""
seen["plain_text"], seen["plain_chunks"] = text, chunks

# A client that asks for usage gets it, in a last chunk without choices.
stream = client.chat.completions.create(
    model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
)
last = None
for chunk in stream:
    if chunk.choices:
        assert chunk.usage is None, chunk
    last = chunk
seen["asked_last_choices"] = len(last.choices)
seen["asked_completion_tokens"] = last.usage.completion_tokens

# The Responses API reports usage in its last event.
done = None
for event in client.responses.create(model="gpt-4o", input="Say hello.", stream=True):
    if event.type == "response.completed":
        done = event
seen["responses_output_tokens"] = done.response.usage.output_tokens

print(json.dumps(seen))
