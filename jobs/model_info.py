"""Prints parameters, MACs, FLOPs, weights size, resize size and published accuracy of the MnasNet variants."""

import argparse
import json
import sys
from pathlib import Path

# Importable from a checkout where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model_info.py",
        description="Parameters (exact), multiply-accumulates and FLOPs (FLOPs = 2 x MACs, torch.utils.flop_counter, "
        "one 224x224 image), weights file size, resize size and torchvision's published ImageNet-1k accuracy "
        "of the four MnasNet variants. Downloads nothing.",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table", help="Markdown table or JSON list")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mnasnet_batch.evaluation import model_info

    rows = model_info.describe_all()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(model_info.table(rows))
        print(f"\nMACs and FLOPs for one {model_info.INPUT_SIZE}x{model_info.INPUT_SIZE} image; FLOPs = 2 x MACs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
