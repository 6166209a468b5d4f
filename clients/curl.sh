#!/usr/bin/env bash
# frankly with curl: models, directions, chat, streaming, and per-request steering.
#
#   frankly serve --model demo                      # in another terminal
#   BASE_URL=http://127.0.0.1:8000 clients/curl.sh
#
# Environment: BASE_URL (default http://127.0.0.1:8000), API_KEY (default
# $OPENAI_API_KEY; none for a server without keys), MODEL (default: the first
# id from /v1/models), DIRECTION (default refusal), MAX_TOKENS (default 48).
# The conditional example needs jq to read /v1/directions; without jq it is skipped.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: $(...) fails with the command

BASE_URL="${BASE_URL:-http://127.0.0.1:8000}"
BASE_URL="${BASE_URL%/}"
API_KEY="${API_KEY:-${OPENAI_API_KEY:-}}"
DIRECTION="${DIRECTION:-refusal}"
MAX_TOKENS="${MAX_TOKENS:-48}"
PROMPT="${PROMPT:-In one sentence, what is a residual stream in a transformer?}"

auth=()
if [ -n "$API_KEY" ]; then auth=(-H "Authorization: Bearer $API_KEY"); fi

# curl with the key, JSON content type, and a non-zero exit on HTTP errors (the body is still printed).
api() {
  local rc=0
  curl -sS --fail-with-body ${auth[@]+"${auth[@]}"} -H "Content-Type: application/json" "$@" || rc=$?
  echo
  return "$rc"
}
section() { printf '\n== %s\n' "$*"; }

section "models"
models=$(api "$BASE_URL/v1/models") || { echo "$models"; exit 1; }
echo "$models"
if [ -z "${MODEL:-}" ]; then
  MODEL=$(printf '%s' "$models" | grep -o '"id": *"[^"+]*"' | head -n1 | sed 's/.*"id": *"\([^"]*\)"/\1/')
fi

section "directions"
directions=$(api "$BASE_URL/v1/directions") || { echo "$directions"; exit 1; }
echo "$directions"

msg="{\"role\": \"user\", \"content\": \"$PROMPT\"}"

section "chat ($MODEL, no steering)"
api "$BASE_URL/v1/chat/completions" -d "{
  \"model\": \"$MODEL\", \"messages\": [$msg], \"max_tokens\": $MAX_TOKENS, \"temperature\": 0
}"

section "streamed chat (SSE; the final chunk carries \"steering\")"
api -N "$BASE_URL/v1/chat/completions" -d "{
  \"model\": \"$MODEL\", \"messages\": [$msg], \"max_tokens\": $MAX_TOKENS, \"temperature\": 0,
  \"stream\": true, \"stream_options\": {\"include_usage\": true}
}"

if ! printf '%s' "$directions" | grep -q "\"name\": *\"$DIRECTION\""; then
  echo "direction '$DIRECTION' is not loaded on this server: skipping the steering examples"
  exit 0
fi

section "steering via the body field (response headers shown: see X-Steering)"
api -i "$BASE_URL/v1/chat/completions" -d "{
  \"model\": \"$MODEL\", \"messages\": [$msg], \"max_tokens\": $MAX_TOKENS, \"temperature\": 0,
  \"steering\": {\"$DIRECTION\": 1.0}
}"

section "steering via the model id $MODEL+$DIRECTION:0.5"
api "$BASE_URL/v1/chat/completions" -d "{
  \"model\": \"$MODEL+$DIRECTION:0.5\", \"messages\": [$msg], \"max_tokens\": $MAX_TOKENS, \"temperature\": 0
}"

section "steering as a JSON string (some frontends send it so), streamed"
api -N "$BASE_URL/v1/chat/completions" -d "{
  \"model\": \"$MODEL\", \"messages\": [$msg], \"max_tokens\": $MAX_TOKENS, \"temperature\": 0,
  \"stream\": true, \"steering\": \"{\\\"$DIRECTION\\\": 1.0}\"
}"

section "conditional steering {\"$DIRECTION\": {\"strength\": 1.0, \"when\": \"auto\"}}"
if ! command -v jq >/dev/null; then
  echo "skipped: jq is not installed"
elif [ "$(printf '%s' "$directions" | jq -r --arg n "$DIRECTION" '.data[] | select(.name == $n) | .conditional')" = "true" ]; then
  api "$BASE_URL/v1/chat/completions" -d "{
    \"model\": \"$MODEL\", \"messages\": [$msg], \"max_tokens\": $MAX_TOKENS, \"temperature\": 0,
    \"steering\": {\"$DIRECTION\": {\"strength\": 1.0, \"when\": \"auto\"}}
  }"
else
  echo "skipped: direction '$DIRECTION' has no calibrated condition (conditional=false)"
fi

section "an error (OpenAI envelope, HTTP 400)"
api "$BASE_URL/v1/chat/completions" -d "{
  \"model\": \"$MODEL\", \"messages\": [$msg], \"max_tokens\": 1, \"steering\": {\"no-such-direction\": 1.0}
}" || echo "(curl exited $?, as expected for an HTTP 400)"

printf '\nok\n'
