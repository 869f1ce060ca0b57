#!/usr/bin/env bash
# The router with curl. HERD_URL defaults to the router on this machine.
set -euo pipefail
HERD_URL=${HERD_URL:-http://localhost:11435}
MODEL=${HERD_MODEL:-llama3.2:3b}

# Which nodes are there, and what is hot where?
curl -sS "$HERD_URL/fleet/status"; echo
curl -sS "$HERD_URL/api/tags"; echo
curl -sS "$HERD_URL/api/ps"; echo

# Ollama-native chat, not streaming (-i shows the X-Herd-* headers: which node served).
curl -sS -i "$HERD_URL/api/chat" \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"stream\": false}"
echo

# OpenAI-compatible chat, streaming (SSE, ends with data: [DONE]).
curl -sS -N "$HERD_URL/v1/chat/completions" -H 'Content-Type: application/json' \
  -H 'X-Herd-Tags: examples, curl' \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"stream\": true}"
echo
