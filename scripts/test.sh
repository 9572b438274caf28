#!/usr/bin/env bash
# Set up everything, type-check the code and the tests (mypy, settings in
# pyproject.toml), and run the whole test suite (unit + integration against
# real PostgreSQL, Redis, dcmtk, dicom3tools, Orthanc). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "==> mypy"
.venv/bin/mypy .
scripts/services.sh
exec .venv/bin/python -m pytest "$@"
