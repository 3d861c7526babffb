#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the cp312 wheels that tools/gpu_check.sh installs on a GPU
# machine without network (Python 3.12, torch, transformers, numpy, safetensors, pyyaml, aiohttp,
# rich, tensorboard already there): megatron-core, whose own needs (torch, numpy, packaging) are
# there too. Run where pip reaches PyPI.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "megatron-core==${MEGATRON_CORE_VERSION:-0.19.2}"
du -sh .whl
