#!/usr/bin/env bash
# Sets up .venv on first use, then runs the labeling job with the embedded default profile (conf/local.yaml):
#   bash scripts/label.sh --input ~/photos --output ./labels [--weights PATH] [--set section.key=value ...]
# Relative paths are the caller's: the job runs in the directory this was called from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/mnasnet-label" ] || bash "$root/scripts/setup.sh" s3,onnx,iceberg,heif
exec "$root/.venv/bin/python" "$root/jobs/label_images.py" --config "$root/conf/local.yaml" "$@"
