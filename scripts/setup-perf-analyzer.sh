#!/usr/bin/env bash
# perf_analyzer 2.51.0 in its own tool environment: .tools/perf_analyzer (a venv with the
# tritonclient 2.51.0 manylinux wheel, which ships the binary, and libcudart.so.12 from
# nvidia-cuda-runtime-cu12) plus Debian's libb64-0d; .tools/bin/perf_analyzer runs it.
# Newer tritonclient wheels need glibc 2.38; this one runs on Debian 12's 2.36. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TOOL=.tools/perf_analyzer

if ! ldconfig -p | grep -q "libb64.so.0d"; then
  echo "installing libb64-0d (perf_analyzer links it)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libb64-0d; else sudo apt-get install -y -qq libb64-0d; fi
fi
[ -x "$TOOL/bin/python" ] || "$PYTHON" -m venv "$TOOL"
"$TOOL/bin/python" -m pip install -q --disable-pip-version-check "tritonclient[grpc]==2.51.0" \
  "nvidia-cuda-runtime-cu12>=12,<13"
cudart=$("$TOOL/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))')
mkdir -p .tools/bin
cat > .tools/bin/perf_analyzer <<SH
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$(pwd)/$TOOL/bin/perf_analyzer" "\$@"
SH
chmod +x .tools/bin/perf_analyzer
.tools/bin/perf_analyzer --version >/dev/null  # fails here if a library is missing
echo "perf_analyzer: $(pwd)/.tools/bin/perf_analyzer"
