#!/usr/bin/env bash
# The video parity reference: transformers' own video processors need torchvision, which has no CPU build
# for our torch, so the reference runs in an environment of its own (.tools/video-ref) with a torch that
# has one (a CUDA build; it runs on CPUs). Idempotent; the tests call it when they need it.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=.tools/video-ref
mkdir -p .tools
exec 9>.tools/video-ref.lock  # the test workers may ask at once: one installs, the other waits for it
flock 9
[ -f "$ENV/installed" ] && exit 0  # written last: an install cut short is done again
"${PYTHON:-python3}" -m venv "$ENV"
# --no-compile: pip would compile every module of these 5.8 GB (58 CPU-s, 34 without); the check below
# compiles the ones the reference imports (its bytecode is written whatever the caller's environment says)
"$ENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile \
  "torch==2.14.1" "torchvision==0.29.1" "transformers==4.57.6" "tokenizers>=0.22,<0.23" "av" "numpy<2" "pillow" "safetensors"
env -u PYTHONDONTWRITEBYTECODE "$ENV/bin/python" -c "import torchvision, av, transformers"
touch "$ENV/installed"
