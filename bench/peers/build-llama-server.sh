#!/usr/bin/env bash
# Build llama.cpp's own llama-server (and its ggml-rpc-server, the peer of a neuron lending a
# device: bench/pooling.py) from the llama.cpp that the installed llama-cpp-python
# was compiled from (its sdist vendors it in vendor/llama.cpp), with the same CMake
# arguments scripts/dev.sh gave that build, so the neuron and llama-server run the same
# kernels. Prints the binary's path on stdout (progress goes to stderr); a binary already
# built for this version and these arguments is reused.
#
#   bench/peers/build-llama-server.sh        # from the repository root
#   PYTHON=other/python bench/peers/...      # the interpreter whose llama-cpp-python counts
#
# Output: .cache/peers/llama-server-<version>-<args hash>/bin/llama-server (shared libraries
# beside it, as llama-cpp-python ships them).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
py=${PYTHON:-.venv/bin/python}

version=$("$py" -c 'import llama_cpp; print(llama_cpp.__version__)')

# The same arguments as scripts/dev.sh: CMAKE_ARGS from the caller, else this host's (CUDA
# where nvcc and a GPU are found, no AMX where it is advertised).
args=${CMAKE_ARGS:-$(scripts/llama-cpp-cmake-args)}
# What the server needs on top. llama-cpp-python builds shared libraries in Release
# (scikit-build-core's default) with curl off; the UI stays out because its prebuilt assets
# would be downloaded at build time and the bench never serves it.
server_args="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=ON \
-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF"

key=$(printf '%s\n%s\n%s\n' "$version" "$args" "$server_args" | sha256sum | cut -c1-12)
peers=$root/.cache/peers
out=$peers/llama-server-$version-$key
bin=$out/bin/llama-server
if [ -x "$bin" ] && [ -x "$out/bin/ggml-rpc-server" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$peers"
src=$peers/llama_cpp_python-$version
if [ ! -d "$src/vendor/llama.cpp" ]; then
  echo "downloading the llama-cpp-python $version sdist…" >&2
  rm -rf "$peers/sdist"
  "$py" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    -d "$peers/sdist" "llama-cpp-python==$version" >&2
  tar -xzf "$peers"/sdist/*.tar.gz -C "$peers"
fi

# The sdist carries no llama.cpp git history: its CHANGELOG names the upstream commit.
commit=$(awk -v v="## [$version]" '$0 == v {on = 1; next} /^## \[/ {on = 0} on' \
  "$src/CHANGELOG.md" | grep -m1 -o 'ggml-org/llama.cpp@[0-9a-f]*' || echo unknown)
echo "building llama-server: llama-cpp-python $version ($commit), args: $args" >&2

# Built in place: the binary is linked last, so its presence means a finished build, and an
# interrupted one resumes where it stopped.
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
# shellcheck disable=SC2086  # the argument strings are meant to split
cmake -S "$src/vendor/llama.cpp" -B "$out" "${gen[@]}" $args $server_args >&2
cmake --build "$out" --target llama-server ggml-rpc-server -j "$(nproc)" >&2
printf '%s\n%s\n%s\n' "$version ($commit)" "$args" "$server_args" >"$out/BUILD-INFO"
echo "$bin"
