"""The output location of a run: guarding it, recording the configuration, and counting what was written."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import pyarrow.dataset as pads
import yaml
from fsspec.core import url_to_fs

from mnasnet_batch.config import JobConfig, to_dict
from mnasnet_batch.storage import StorageError

CONFIG_FILE = "_config.yaml"


@dataclass(frozen=True)
class Summary:
    """What a finished run wrote."""

    images: int
    errors: int
    seconds: float
    error_kinds: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.error_kinds.items()))
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"labeled {self.images} images ({self.errors} errors{': ' + kinds if kinds else ''}) "
            f"in {self.seconds:.1f} s, {rate:.1f} images/s"
        )


def prepare_output(config: JobConfig) -> None:
    """Refuses an output that already holds Parquet files, then records the resolved configuration there.

    Raises:
        StorageError: the location cannot be written, or already holds results.
    """
    uri = config.output.uri
    try:
        fs, root = url_to_fs(uri)
        existing = [p for p in fs.find(root) if p.endswith(".parquet")] if fs.exists(root) else []
        if existing:
            raise StorageError(
                f"output {uri} already holds {len(existing)} Parquet files; choose a new --output or delete them"
            )
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/{CONFIG_FILE}", "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"output {uri} cannot be written: {type(exc).__name__}: {exc}") from None


def summarize(uri: str, seconds: float) -> Summary:
    """Counts rows and error kinds in the Parquet files under ``uri``."""
    fs, root = url_to_fs(uri)
    dataset = pads.dataset(root, filesystem=fs, format="parquet", exclude_invalid_files=False)
    errors = dataset.to_table(columns=["error"])["error"].drop_null().to_pylist()
    kinds = collections.Counter(message.split(":", 1)[0] for message in errors)
    return Summary(images=dataset.count_rows(), errors=len(errors), seconds=seconds, error_kinds=dict(kinds))
