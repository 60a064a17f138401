#!/usr/bin/env bash
# Runs any command with the project on the path; `airflow ...` and `finsent ...` both work.
set -euo pipefail
export PYTHONPATH="/opt/finsent${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
