"""Batch image labeling with torchvision's MnasNet on Ray Data.

The package shows the job's stages (docs/architecture.md opens with the tree):

- ``cli`` (the command), ``config`` (settings from a YAML profile and ``--set``), ``storage`` and ``reads`` (one
  handle for every read and write), ``progress``, ``watchdog``.
- ``job``: the only module that builds the Ray Data graph: read -> decode -> predict -> write.
- ``inputs``: what a job reads, its layout chosen once (files, manifests, WebDataset, Parquet; one module each),
  and ``inputs.spool`` for lists of URIs too long for the driver's memory.
- ``decode``: bytes to the model's uint8 crops, on CPU tasks (``preprocess``) or on the actor's device
  (``device_preprocess``).
- ``model``: the checkpoint (``weights``), what runs it (``engine``), the actor (``predictor``), its rows
  (``postprocess``).
- ``outputs``: the run lifecycle every target shares (``run``, ``lease``), the Parquet folder (``folder``), the
  Iceberg table (``table``, ``iceberg``), chosen once (``targets.target_for``).
- ``evaluation``: around the job (ground truth and accuracy, model costs, run reports, run listings).
"""

__version__ = "0.1.0"
