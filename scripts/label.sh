#!/usr/bin/env bash
# Sets up .venv on first use, then runs the labeling job with the embedded default profile (conf/local.yaml):
#   bash scripts/label.sh --input ~/photos --output ./labels [--weights PATH] [--set section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mnasnet-label ] || bash scripts/setup.sh s3
exec .venv/bin/python jobs/label_images.py --config conf/local.yaml "$@"
