#!/usr/bin/env bash
# Create .venv in the repository root and install everything (idempotent; fast when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# The python backend stub links libpython3.X.so.1.0. An interpreter built with its own shared
# library (pyenv, conda) provides it; otherwise it comes from the distribution.
if ! "$PYTHON" - <<'PY'
import os, sys, sysconfig
libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
sys.exit(0 if libdir and soname and os.path.exists(os.path.join(libdir, soname)) else 1)
PY
then
  soname=$("$PYTHON" -c 'import sys; print(f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0")')
  if ! ldconfig -p | grep -q "$soname"; then
    pkg=$("$PYTHON" -c 'import sys; print(f"libpython{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "installing $pkg (the Triton python backend stub links $soname)"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "$pkg"; else sudo apt-get install -y -qq "$pkg"; fi
  fi
fi

# The embedding cache's shared tier is Redis; its tests start a real redis-server on a free port.
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server (the embedding cache tests run one)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; else sudo apt-get install -y -qq redis-server; fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
