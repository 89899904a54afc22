#!/usr/bin/env bash
# Set up .venv (CPU torch pin first where no torch is installed) and run a task in it.
#   scripts/dev.sh test   - install with test extras, ruff, then the whole test suite
#   scripts/dev.sh setup  - install only
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip_q() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

# An unpinned `torch` pulls gigabytes of CUDA wheels; on hosts without torch take the
# pinned build first. GPU hosts that already have their CUDA torch keep it
# (the project only asks for torch>=2.4).
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  pip_q "$TORCH_PIN"
fi

# llama-cpp-python compiles llama.cpp when no wheel for it is built yet: minutes on a small
# machine, so say so rather than sit silent. The wheel is built once per set of CMake
# arguments into ~/.cache/helexa/wheels (pip's own wheel cache ignores CMAKE_ARGS and would
# hand back a build made for another CPU or without CUDA). Where nvcc and an NVIDIA GPU (its
# driver) are both present the build gets CUDA (GGML_CUDA); on x86 CPUs that advertise AMX
# it leaves llama.cpp's AMX path out (scripts/llama-cpp-cmake-args says why). CMAKE_ARGS set
# by the caller wins (and is taken as it is). Without it, an installed build with AMX compiled
# in on such a CPU is replaced (the neuron would run it with llama.cpp's extra buffer types
# off, its repacked kernels with them).
LLAMA_CPP_REQ=${LLAMA_CPP_REQ:-llama-cpp-python>=0.3.16}
llama_cpp_usable() {
  "$py" - "${CMAKE_ARGS:-}" <<'PY' >/dev/null 2>&1
import sys
import llama_cpp
if sys.argv[1]:  # built as the caller asked
    sys.exit(0)
info = llama_cpp.llama_print_system_info().decode()
cpu = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
sys.exit(1 if "AMX_INT8 = 1" in info and " amx_tile" in cpu else 0)
PY
}
want_llama_cpp() {
  if llama_cpp_usable; then return; fi
  local args why
  if [ -n "${CMAKE_ARGS:-}" ]; then
    args=$CMAKE_ARGS
    why="CMAKE_ARGS=$args"
  else
    args=$(scripts/llama-cpp-cmake-args)
    why=$(scripts/llama-cpp-cmake-args --why)
  fi
  local key
  key=$(printf '%s\n%s\n' "$LLAMA_CPP_REQ" "$args" | sha256sum | cut -c1-16)
  local wheels="${XDG_CACHE_HOME:-$HOME/.cache}/helexa/wheels/llama-cpp-python-$key"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python: $why. It compiles llama.cpp: several minutes on a" \
      "small machine, cached in $wheels…" >&2
    mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$args" "$py" -m pip wheel --disable-pip-version-check --no-deps \
      --no-cache-dir --progress-bar on -w "$wheels.tmp" "$LLAMA_CPP_REQ"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  "$py" -m pip install --disable-pip-version-check -q --force-reinstall --no-deps \
    "$wheels"/llama_cpp_python-*.whl
  pip_q "$LLAMA_CPP_REQ"   # its pure-Python dependencies
}

# rpmbuild lets the packaging tests build the source RPMs; best effort (root + apt only).
want_rpmbuild() {
  if ! command -v rpmbuild >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
      && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends rpm >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && \
           apt-get install -y -q --no-install-recommends rpm >/dev/null 2>&1; } \
      || echo "note: could not install rpm; the RPM build test will be skipped" >&2
  fi
}

# The Claude Code CLI, from the npm registry into a project-local folder, for the test that
# drives it against a real cortex; best effort (the test says why it skips without it).
want_claude_code() {
  local dir=.cache/claude-code
  if [ -x "$dir/node_modules/.bin/claude" ]; then return; fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "note: no npm; the Claude Code test will be skipped" >&2
    return
  fi
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-fund --no-audit --loglevel=error @anthropic-ai/claude-code \
    >/dev/null 2>&1 \
    || echo "note: could not install the Claude Code CLI; its test will be skipped" >&2
}

task=${1:-test}
case "$task" in
  setup)
    want_llama_cpp
    pip_q -e ".[neuron]"
    ;;
  test)
    want_llama_cpp
    pip_q -e ".[neuron,test]"
    want_rpmbuild
    want_claude_code
    "$VENV/bin/ruff" check src tests bench
    shift || true
    HF_HUB_OFFLINE=1 "$py" -m pytest "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh [setup|test] [pytest args]" >&2
    exit 2
    ;;
esac
