#!/usr/bin/env bash
# Runs the tests in both environments (after an idempotent set-up).
#   scripts/test.sh          fast tests (minutes)
#   scripts/test.sh --slow   also the slow end-to-end tests (real model, real vLLM server)
# Extra arguments after -- go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SLOW=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --slow) SLOW=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "test.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
bash scripts/setup.sh

if [ "$SLOW" = 1 ]; then QUANT_MARK="not serve and not large_sweep"; SERVE_MARK="serve and not large_sweep"
else QUANT_MARK="not serve and not slow and not large_sweep"; SERVE_MARK="serve and not slow"; fi

echo "== tests in .venv (quantize, kernels, evaluation) =="
.venv/bin/python -m pytest -q -m "$QUANT_MARK" "${EXTRA[@]}" tests
echo "== tests in .venv-serve (vLLM plugin; packing against compressed-tensors 0.17) =="
set +e
.venv-serve/bin/python -m pytest -q -m "$SERVE_MARK or packing" "${EXTRA[@]}" tests
rc=$?
set -e
# exit code 5 = no test selected (e.g. the plugin's tests not yet present): not a failure here
[ "$rc" = 5 ] && rc=0
if [ -x .venv-vllm033/bin/python ]; then
  echo "== tests in .venv-vllm033 (the plugin against vLLM 0.33's API) =="
  set +e
  .venv-vllm033/bin/python -m pytest -q -p no:cacheprovider -o addopts="" -m vllm033 "${EXTRA[@]}" tests/serving/test_vllm033.py
  vrc=$?
  set -e
  [ "$rc" = 0 ] && rc=$vrc
else
  echo "== .venv-vllm033 absent: vLLM 0.33 API tests skipped (bash scripts/setup.sh --vllm-033 creates it) =="
fi
exit "$rc"
