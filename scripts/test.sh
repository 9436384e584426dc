#!/usr/bin/env bash
# The whole test suite: lint, unit tests (no Triton), integration tests (real tritonserver).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# the video tests' reference environment (.tools/video-ref, 5.8 GB unpacked): made before the suite, not by
# whichever test first needs it while the other worker runs servers
bash scripts/setup-video-ref.sh || exit 1
.venv/bin/ruff check backends clients tests model_repository || exit 1
# two workers; tests/conftest.py schedules them: the tests on the session's servers on one, the rest where free
.venv/bin/python -m pytest -n 2 tests "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
