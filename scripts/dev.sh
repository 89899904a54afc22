#!/usr/bin/env bash
# Set up .venv (CPU torch pin first where no torch is installed) and run a task in it.
#   scripts/dev.sh test   - install with test extras, ruff, then the whole test suite
#   scripts/dev.sh setup  - install only
#   scripts/dev.sh clients-latest - the Claude Code / Codex tests against their newest
#                                   releases (CI runs them against scripts/clients.pin)
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
# off, its repacked kernels with them), and so is one without the RPC backend (pooling).
LLAMA_CPP_REQ=${LLAMA_CPP_REQ:-llama-cpp-python>=0.3.16}
llama_cpp_usable() {
  "$py" - "${CMAKE_ARGS:-}" <<'PY' >/dev/null 2>&1
import sys
import llama_cpp
if sys.argv[1]:  # built as the caller asked
    sys.exit(0)
if not llama_cpp.llama_supports_rpc():  # pooling needs ggml's RPC backend
    sys.exit(1)
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

# Chromium and its driver let the dashboard's browser test run (tests/cortex/test_dashboard.py);
# best effort (root + apt only): without them that test skips and says why.
want_chromium() {
  if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
      && [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver (the dashboard's browser test)…" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends chromium chromium-driver \
           >/dev/null 2>&1; } \
      || echo "note: could not install chromium; the dashboard's browser test will skip" >&2
  fi
}

# The coding-agent CLIs (Claude Code, Codex) the end-to-end tests drive, from the npm
# registry into a project-local folder: the versions scripts/clients.pin names, or with
# "latest" the newest releases. Best effort: without npm the tests say why they skip.
clients_pinned() { grep -v '^#' scripts/clients.pin | grep -v '^[[:space:]]*$'; }
want_clients() {
  local which=${1:-pinned} dir=.cache/clients/${1:-pinned} wanted
  if ! command -v npm >/dev/null 2>&1; then
    echo "note: no npm; the Claude Code and Codex tests will be skipped" >&2
    return
  fi
  if [ "$which" = latest ]; then
    wanted=$(clients_pinned | sed -E 's/^(@?[^@]+)@.*/\1@latest/')
  else
    wanted=$(clients_pinned)
    # Already there in the pinned versions: nothing to fetch.
    if "$py" - "$dir" $wanted <<'PY'; then return; fi
import json, sys
from pathlib import Path
root = Path(sys.argv[1]) / "node_modules"
for spec in sys.argv[2:]:
    name, _, version = spec.rpartition("@")
    try:
        if json.loads((root / name / "package.json").read_text())["version"] != version:
            sys.exit(1)
    except (OSError, ValueError, KeyError):
        sys.exit(1)
PY
  fi
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # one word per package spec
  npm install --prefix "$dir" --no-fund --no-audit --loglevel=error $wanted \
    >/dev/null 2>&1 \
    || echo "note: could not install $wanted; their tests will be skipped" >&2
}

CLIENT_TESTS="tests/cortex/test_claude_code.py tests/cortex/test_codex.py"

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
    want_chromium
    want_clients pinned
    "$VENV/bin/ruff" check src tests bench
    shift || true
    HF_HUB_OFFLINE=1 "$py" -m pytest "$@"
    ;;
  clients-latest)
    # The newest Claude Code and Codex against the same end-to-end tests as the pins.
    want_llama_cpp
    pip_q -e ".[neuron,test]"
    want_clients latest
    dir=.cache/clients/latest
    for spec in $(clients_pinned); do
      name=${spec%@*}
      echo "$name: pinned ${spec##*@}, latest" \
        "$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
          "$dir/node_modules/$name/package.json" 2>/dev/null || echo "not installed")"
    done
    shift || true
    # shellcheck disable=SC2086
    HELEXA_CLIENTS="$PWD/$dir" HF_HUB_OFFLINE=1 "$py" -m pytest -rs $CLIENT_TESTS "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh [setup|test|clients-latest] [pytest args]" >&2
    exit 2
    ;;
esac
