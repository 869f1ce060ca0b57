"""Chat through herd with the Ollama Python client: the router speaks Ollama's API on 11435.

HERD_URL=http://localhost:11435 HERD_MODEL=llama3.2:3b python examples/ollama_chat.py
"""

import os

from ollama import Client

client = Client(host=os.environ.get("HERD_URL", "http://localhost:11435"))
model = os.environ.get("HERD_MODEL", "llama3.2:3b")

for entry in client.list().models:
    print("available:", entry.model)

reply = client.chat(model=model, messages=[{"role": "user", "content": "Hello!"}])
print(reply.message.content)

for part in client.chat(
    model=model, messages=[{"role": "user", "content": "Count to five."}], stream=True
):
    print(part.message.content, end="", flush=True)
print()
