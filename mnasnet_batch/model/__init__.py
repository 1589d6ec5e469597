"""The model stage, held by the actors: the checkpoint (``weights``), what runs it (``engine``: torch or ONNX
Runtime), the actor class (``predictor``) and the top-k rows it returns (``postprocess``). Importing the package
imports nothing: torch comes with ``weights``, ``engine`` and ``predictor``, never with the decode or write tasks."""
