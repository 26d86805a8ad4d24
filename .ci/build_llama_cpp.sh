#!/usr/bin/env bash
# llama.cpp's converter and its llama-completion and llama-tokenize, from llama-cpp-python's source
# distribution on PyPI, built inside the clone (llama.cpp/, ignored by git); about 4 minutes on 2
# cores. Prints the folder to set as LLAMA_CPP_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
src="llama.cpp/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -x "$src/build/bin/llama-completion" ] || [ ! -x "$src/build/bin/llama-tokenize" ]; then
    mkdir -p llama.cpp
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d llama.cpp
    tar xzf "llama.cpp/llama_cpp_python-$version.tar.gz" -C llama.cpp
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF >/dev/null
    cmake --build "$src/build" --target llama-completion llama-tokenize -j "$(nproc)" >/dev/null
fi
echo "$PWD/$src"
