"""Chat through herd with the OpenAI Python SDK: point base_url at the router, nothing else.

HERD_URL=http://localhost:11435 HERD_MODEL=llama3.2:3b python examples/openai_chat.py
"""

import os

from openai import OpenAI

router = os.environ.get("HERD_URL", "http://localhost:11435")
model = os.environ.get("HERD_MODEL", "llama3.2:3b")
client = OpenAI(base_url=f"{router}/v1", api_key="not-needed")

# Not streaming: one answer, with real token counts.
answer = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello in five words."}],
    extra_body={"metadata": {"tags": ["examples", "openai"]}},
)
print(answer.choices[0].message.content)
assert answer.usage is not None  # herd always reports the counts
print(f"tokens: {answer.usage.prompt_tokens} in, {answer.usage.completion_tokens} out")

# Streaming: tokens as they are generated.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count to five."}],
    stream=True,
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
