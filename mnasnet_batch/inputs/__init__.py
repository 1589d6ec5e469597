"""The input stage: what a job reads, and reading it. ``listing`` lists the input once and chooses its layout;
one module per layout (``files``, ``manifests``, ``webdataset``, ``parquet``), each a ``layout.Layout``;
``spool`` writes a list of URIs too long for the driver's memory under the output. Importing the package imports
nothing."""
