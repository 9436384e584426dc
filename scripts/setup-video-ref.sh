#!/usr/bin/env bash
# The video parity reference: transformers' own video processors need torchvision, which has no CPU build
# for our torch, so the reference runs in an environment of its own (.tools/video-ref) with a torch that
# has one (a CUDA build; it runs on CPUs). Idempotent; the tests call it when they need it.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=.tools/video-ref
if [ -x "$ENV/bin/python" ] && "$ENV/bin/python" -c "import torchvision, av, transformers" 2>/dev/null; then exit 0; fi
mkdir -p .tools
"${PYTHON:-python3}" -m venv "$ENV"
"$ENV/bin/python" -m pip install -q --disable-pip-version-check \
  "torch==2.14.1" "torchvision==0.29.1" "transformers==4.57.6" "tokenizers>=0.22,<0.23" "av" "numpy<2" "pillow" "safetensors"
