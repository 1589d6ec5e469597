"""The one place that chooses the output target from the configuration."""

from __future__ import annotations

from mnasnet_batch.config import TABLE_ONLY_MODES, ConfigError, JobConfig
from mnasnet_batch.outputs.folder import ParquetFolder
from mnasnet_batch.outputs.run import OutputTarget


def target_for(config: JobConfig) -> OutputTarget:
    """The output target ``output.table`` chooses, checked before anything is read.

    Raises:
        ConfigError: a mode the Parquet folder cannot do, or a table output that cannot be used (pyiceberg
            missing, an object-store output without ``output.catalog``).
    """
    if config.output.table:
        from mnasnet_batch.outputs.table import IcebergTable

        return IcebergTable.for_config(config)
    if config.output.mode in TABLE_ONLY_MODES:
        raise ConfigError(
            f"--mode {config.output.mode} needs the table output: in a Parquet folder it would leave two rows for "
            f"one image; set output.table (e.g. --set output.table=labels.images)"
        )
    return ParquetFolder()

