"""Entrypoint for `python jobs/label_images.py` and `ray job submit ... -- python jobs/label_images.py`."""

import sys
from pathlib import Path

# Importable from a checkout where the package is not installed (the working dir of `ray job submit`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnasnet_batch.cli import build_parser, entrypoint, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    entrypoint()
