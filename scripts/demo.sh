#!/usr/bin/env bash
# The main job: set up, build the default tiny model if missing, start tritonserver, stream one
# request with two images over gRPC, print the answer, its token ids and the time to first token, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m triton_vlm_clients.demo "$@"
