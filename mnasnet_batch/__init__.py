"""Batch image labeling with torchvision's MnasNet on Ray Data.

Data flows through one module per stage:

- ``config``: typed, frozen dataclasses loaded from a YAML profile and ``--set`` overrides.
- ``storage``: fsspec / pyarrow filesystems from the ``storage`` config (local, s3, gs, az, memory), listing, reads.
- ``sources``: the input layouts (loose images, WebDataset tar shards, Parquet of bytes, manifests of URIs), one
  class each: what it lists, how that becomes blocks, how a block is read (bytes, or an error per image).
- ``weights``: the four MnasNet variants, finding and verifying their checkpoints.
- ``preprocess``: bytes -> Pillow decode -> resize + centre crop -> uint8 HWC, or an error per image.
- ``device_preprocess``: with ``preprocess.decode_on=actor``, JPEG bytes -> batched decode (nvJPEG on a GPU) ->
  Pillow's exact resize + crop, on the model actor's device.
- ``predictor``: the model actor: uint8 -> normalise on device -> MnasNet (fp32, or fp16/bf16 autocast) -> top-k.
- ``postprocess``: top-k and the Parquet output schema.
- ``output``: guards the output location, records the config, counts what was written.
- ``pipeline``: the only module that builds the Ray Data graph (read -> decode -> predict -> write) and sizes the
  model actor pool; ``cli``: the job's command line; ``progress``: a bar at a terminal, else a log line every N
  seconds.

Around the job, for ``jobs/evaluate.py``, ``jobs/model_info.py``, ``jobs/report.py`` and ``jobs/runs.py``:

- ``imagenet``: the ImageNet-1k wnid list (package data) in torchvision's class order.
- ``ground_truth``: labels from class folders, ``LOC_val_solution.csv`` or the devkit; ``metrics``: top-1/top-5.
- ``model_info``: parameters, MACs and FLOPs; ``report``: a run's HTML page with PNG charts.
- ``runs``: the runs under an output root, from their ``_run.json`` records.
"""

__version__ = "0.1.0"
