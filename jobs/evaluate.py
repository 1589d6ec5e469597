"""Evaluates a MnasNet on a labeled image set with the labeling pipeline: top-1/top-5 to metrics.json."""

import dataclasses
import logging
import sys
from pathlib import Path

# Importable from a checkout where the package is not installed (the working dir of `ray job submit`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnasnet_batch import cli  # noqa: E402
from mnasnet_batch.config import ConfigError  # noqa: E402

# Where the labeling job's own Parquet output goes, under --output.
PREDICTIONS_DIR = "predictions"


def build_parser():
    """The labeling job's options, plus where the ground truth is."""
    parser = cli.build_parser()
    parser.prog = "evaluate.py"
    parser.description = (
        "Label a labeled image set with the labeling pipeline and score it: writes metrics.json (top1/top5 in "
        "percent, per-class accuracy), per_image.parquet, and the predictions under OUTPUT/predictions/. "
        "Without --labels or --label-column, each image's parent folder must be its wnid (ImageNet val as "
        "n01440764/...)."
    )
    parser.add_argument(
        "--labels",
        help="ground truth for a flat folder: LOC_val_solution.csv, or the devkit's "
        "ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line)",
    )
    parser.add_argument(
        "--label-column",
        help="ground truth kept from the dataset itself: this column of its rows (a Hugging Face dataset's label), "
        "an ImageNet-1k class index 0-999; the input may be of any layout that keeps columns (input.keep_columns)",
    )
    parser.add_argument(
        "--synsets",
        help="for the devkit form: its data/meta.mat (default: meta.mat beside --labels), or a text file with "
        "one wnid per line in ILSVRC2012_ID order",
    )
    return parser


def main(argv=None) -> int:
    """Runs the evaluation; returns the process exit status (0 ok, 2 bad configuration, inputs or labels)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = cli.config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Top-5 accuracy needs five classes per image, whatever the profile says. Ground truth names image files, or is
    # a column of the dataset, which the run keeps.
    if args.label_column:
        keep = tuple(dict.fromkeys([*config.input.keep_columns, args.label_column]))
        run_input = dataclasses.replace(config.input, keep_columns=keep)
    else:
        run_input = dataclasses.replace(config.input, format="files")
    run_config = dataclasses.replace(
        config,
        input=run_input,
        output=dataclasses.replace(config.output, uri=f"{config.output.uri.rstrip('/')}/{PREDICTIONS_DIR}"),
        model=dataclasses.replace(config.model, top_k=max(5, config.model.top_k)),
    )

    from mnasnet_batch.evaluation import ground_truth, metrics
    from mnasnet_batch.model.weights import WeightsError, torchvision_weights
    from mnasnet_batch.outputs import folder
    from mnasnet_batch.storage import Storage, StorageError

    storage = Storage(config.storage)
    try:
        checkpoint, inputs = cli.prepare_input(run_config, storage)
        images = None
        if not args.label_column:
            images = inputs.listed().to_pylist()  # an evaluation set: tens of thousands of images at most
            truth = ground_truth.load_ground_truth(images, args.labels or "", args.synsets or "", storage)
        # The labeling job's run rules apply: a finished evaluation is refused (--mode overwrite redoes it),
        # an interrupted one resumes.
        plan = folder.plan_run(run_config, checkpoint.weights_id, storage)
    except (ConfigError, WeightsError, StorageError, ground_truth.GroundTruthError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    summary = cli.label_remaining(run_config, checkpoint, inputs, plan)
    kept = (args.label_column,) if args.label_column else ()
    predictions = metrics.read_predictions(run_config.output.uri, images, storage, kept)
    if args.label_column:
        try:
            truth = ground_truth.from_label_column(predictions.to_pylist(), args.label_column)
        except ground_truth.GroundTruthError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    logging.getLogger(__name__).info("ground truth: %s", truth.layout)
    weights = torchvision_weights(config.model.name)
    scores, per_image = metrics.score(predictions, truth.labels, weights.meta["categories"])
    published = weights.meta["_metrics"]["ImageNet-1K"]
    result = {
        "model": config.model.name,
        "weights": checkpoint.weights_id,
        "ground_truth": truth.layout,
        **scores,
        "published": {"top1": published["acc@1"], "top5": published["acc@5"]}
        if checkpoint.weights_id == weights.name
        else None,
        "run_id": plan.run_id,
        "seconds": summary.seconds,
    }
    metrics.write_results(config.output.uri, result, per_image, storage)
    print(summary.line())
    print(
        f"{config.model.name}: top-1 {result['top1']:.3f} %, top-5 {result['top5']:.3f} % "
        f"over {result['images']} images ({result['errors']} errors)"
        + (f"; published {published['acc@1']} / {published['acc@5']}" if result["published"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
