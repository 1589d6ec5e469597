#!/usr/bin/env bash
# Creates .venv (if absent) and installs the package with the given extras, e.g. `scripts/setup.sh test,s3`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch and torchvision are installed first as a matched pair; override with TORCH_SPEC for another build.
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
