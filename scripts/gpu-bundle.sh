#!/usr/bin/env bash
# Build .gpu/ (git-ignored): what scripts/gpu-check.sh needs on a lent GPU machine that has Python 3.12,
# torch, CUDA and no network, no tritonserver, no tritonclient (docs/gpu.md).
#
#   .gpu/site.tar.xz  one folder for PYTHONPATH, unpacked there:
#     - pytriton/tritonserver + nvidia_pytriton.libs from the nvidia-pytriton wheel we pin: the tritonserver
#       2.51 binary, the python backend, its Python 3.12 stub and their libraries (not the wheel's Python
#       client, nor the libpython 3.13 it carries);
#     - Python 3.12 wheels of what our code needs at our pins that the machine has at other versions or
#       not at all: transformers, tokenizers, huggingface_hub, numpy 1.x (the python backend stub misreads
#       BYTES tensors under numpy 2: every image request killed the stub), tritonclient (gRPC; its
#       perf_analyzer left out), protobuf and python-rapidjson.
# Torch is never carried: the machine's own (2.11) runs our code. Prints the size of the carry.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup.sh
PY=.venv/bin/python
OUT=.gpu
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

WHEELS=(transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 numpy==1.26.4 tritonclient==2.51.0
        protobuf==4.25.9 python-rapidjson==1.25)
$PY -m pip install -q --disable-pip-version-check --no-deps --no-compile --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --target "$STAGE/site" "${WHEELS[@]}"
rm -rf "$STAGE"/site/tritonclient/perf_analyzer "$STAGE"/site/tritonclient/perf_client "$STAGE"/site/bin

SRC=$($PY -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent)')
mkdir -p "$STAGE/site/pytriton/tritonserver/python_backend_stubs" "$STAGE/site/nvidia_pytriton.libs"
: > "$STAGE/site/pytriton/__init__.py"  # only the server's files; the wheel's client needs more packages
cp -a "$SRC/tritonserver/bin" "$SRC/tritonserver/backends" "$STAGE/site/pytriton/tritonserver/"
cp -a "$SRC/tritonserver/python_backend_stubs/3.12" "$STAGE/site/pytriton/tritonserver/python_backend_stubs/"
find "$SRC/../nvidia_pytriton.libs" -type f ! -name 'libpython3*' -exec cp -a {} "$STAGE/site/nvidia_pytriton.libs/" \;
find "$STAGE/site" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$OUT"
tar -C "$STAGE/site" -cf - . | xz -T0 -6 > "$OUT/site.tar.xz.tmp"
mv "$OUT/site.tar.xz.tmp" "$OUT/site.tar.xz"
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
bundle=$(du -cb "$OUT" | tail -1 | cut -f1)
$PY - "$tree" "$bundle" <<'PY'
import sys
tree, bundle = (int(a) for a in sys.argv[1:])
mib = 1 << 20
print(f"bundle .gpu: {bundle / mib:.1f} MiB; tracked tree {tree / mib:.1f} MiB; carry {(tree + bundle) / mib:.1f} MiB"
      " (limit 60)")
sys.exit(0 if tree + bundle <= 60 * mib else "the carry is over 60 MiB")
PY
