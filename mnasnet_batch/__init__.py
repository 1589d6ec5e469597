"""Batch image labeling with torchvision's MnasNet on Ray Data.

Data flows through one module per stage:

- ``config``: typed, frozen dataclasses loaded from a YAML profile and ``--set`` overrides.
- ``storage``: lists image URIs and reads bytes through fsspec (local, s3, gs, az, memory).
- ``weights``: the four MnasNet variants, finding and verifying their checkpoints.
- ``preprocess``: bytes -> Pillow decode -> resize + centre crop -> uint8 HWC, or an error per image.
- ``predictor``: the model actor: uint8 -> normalise on device -> MnasNet -> softmax top-k.
- ``postprocess``: top-k and the Parquet output schema.
- ``output``: guards the output location, records the config, counts what was written.
- ``pipeline``: the only module that builds the Ray Data graph; ``cli``: the job's command line.
"""

__version__ = "0.1.0"
