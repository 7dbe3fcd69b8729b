#!/usr/bin/env bash
# Builds llama.cpp's own server (llama-server) from the llama.cpp source inside the llama-cpp-python
# sdist that `make fast` downloads, with the same CPU feature switches (the Makefile's
# LLAMA_CMAKE_ARGS: this CPU's x86 features one by one, AMX off). For bench/load_test.py.
#   bash bench/build_llama_server.sh [OUT_DIR]   (prints the binary's path; ~10 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${HOME}/.cache/medlora/llama-server}
print() { make -s --eval "print-var: ; @echo \$($1)" print-var; }
sdist=$(print LLAMA_SDIST)
test -f "$sdist" || .venv/bin/pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$(print LLAMA_CPP_PYTHON)" -d "$(dirname "$sdist")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$sdist" -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
# shellcheck disable=SC2046  # the switches are separate words
cmake -S "$src" -B "$src/build" $(print LLAMA_CMAKE_ARGS) -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF > /dev/null
cmake --build "$src/build" --target llama-server -j"$(nproc)" > /dev/null
mkdir -p "$out"
cp "$src/build/bin/llama-server" "$out/"
echo "$out/llama-server"
