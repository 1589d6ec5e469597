"""Where the rows go: the run lifecycle every target shares (``run``), the Parquet folder (``folder``), the Iceberg
table (``table``), and the one place that chooses between them (``targets.target_for``)."""
