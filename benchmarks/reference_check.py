"""Labels N real-photo crops with the job and checks top-1 against an independent torchvision reference.

The reference opens each file with PIL, applies ``weights.transforms()`` and runs an eager NCHW forward;
the job runs its own pipeline on Ray. Without network access there are no published weights, so both use
the test suite's fixture checkpoint (confident, well-separated predictions), or --weights if given.

    .venv/bin/python benchmarks/reference_check.py --images 300 --workdir /tmp/reference-check
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnasnet_batch.cli import main as label  # noqa: E402
from mnasnet_batch.model.weights import build_model, resolve_checkpoint  # noqa: E402
from tests import support  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reference-check"))
    parser.add_argument("--model", default="mnasnet0_5")
    parser.add_argument("--weights", help="state_dict path; default: the test fixture checkpoint")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    corpus = args.workdir / f"photos-{args.images}"
    paths = sorted(corpus.glob("*")) if corpus.exists() else support.write_corpus(corpus, args.images)
    weights = args.weights
    if weights is None:
        weights = args.workdir / f"fixture-{args.model}.pth"
        if not weights.exists():
            weights.write_bytes(support.checkpoint_bytes(support.make_model(args.model)))
    model = build_model(resolve_checkpoint(args.model, str(weights)))
    output = args.workdir / f"labels-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.monotonic()
    status = label(["--input", str(corpus), "--output", str(output), "--model", args.model, "--weights", str(weights)])
    seconds = time.monotonic() - start
    if status != 0:
        return status
    rows = {r["uri"]: r for r in pads.dataset(output, format="parquet").to_table().to_pylist()}
    ref_ids, ref_scores = support.reference_predictions(paths, model, args.model, 5)
    top1_same = sum(rows[str(p)]["top_k_ids"][0] == ids[0] for p, ids in zip(paths, ref_ids, strict=True))
    top5_same = sum(rows[str(p)]["top_k_ids"] == ids.tolist() for p, ids in zip(paths, ref_ids, strict=True))
    worst = max(
        float(np.abs(np.asarray(rows[str(p)]["top_k_scores"]) - s).max())
        for p, s in zip(paths, ref_scores, strict=True)
    )
    print(
        f"{len(paths)} images, {len(rows)} rows; top-1 identical {top1_same}/{len(paths)}, "
        f"top-5 identical {top5_same}/{len(paths)}, max score difference {worst:.2e}; "
        f"whole job {seconds:.1f} s ({len(paths) / seconds:.1f} images/s)"
    )
    return 0 if top1_same == len(paths) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
