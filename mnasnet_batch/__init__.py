"""Batch image labeling with torchvision's MnasNet on Ray Data.

The data's path, one module per stage (docs/architecture.md says more):

- ``config`` (settings from a YAML profile and ``--set``), ``storage`` (one handle for every read and write),
  ``sources`` (the input's layout, chosen once: files, manifest, WebDataset, Parquet; one class each says
  how its inputs become blocks and how a block is read; ``spool`` writes a list of URIs too long to hold
  under the output, by hash partition), ``weights`` (checkpoints).
- reading -> decoding (``preprocess``: Pillow, resize + crop to uint8; ``device_preprocess``: the same on the
  model's device) -> model actors (``predictor``; ``engine``: torch, or ONNX Runtime on CPU; ``postprocess`` makes
  the top-k rows) -> Parquet parts and run records (``output``; ``progress`` counts). The output target is chosen
  once (``output.target_for``): the Parquet folder, or an Iceberg table (``table``) into which the driver commits
  each run's parts.
- ``pipeline`` is the only module that builds the Ray Data graph; ``cli`` is the command.
- ``evaluation``: around the job (ground truth and accuracy, model costs, run reports, run listings).
"""

__version__ = "0.1.0"
