#!/usr/bin/env bash
# AIPerf 0.13.0 (NVIDIA's OpenAI-API load generator, genai-perf's successor) in its own tool environment:
# .tools/aiperf, run as .tools/bin/aiperf. It speaks HTTP/OpenAI only: point it at `triton-vlm openai`.
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TOOL=.tools/aiperf
[ -x "$TOOL/bin/python" ] || "$PYTHON" -m venv "$TOOL"
"$TOOL/bin/python" -m pip install -q --disable-pip-version-check "aiperf==0.13.0"
mkdir -p .tools/bin
cat > .tools/bin/aiperf <<SH
#!/usr/bin/env bash
unset HF_HUB_OFFLINE  # set, AIPerf 0.13 fails to read a local tokenizer folder
exec "$(pwd)/$TOOL/bin/aiperf" "\$@"
SH
chmod +x .tools/bin/aiperf
.tools/bin/aiperf --version >/dev/null 2>&1 || .tools/bin/aiperf --help >/dev/null
echo "aiperf: $(pwd)/.tools/bin/aiperf"
