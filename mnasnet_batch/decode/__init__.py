"""The decode stage: encoded bytes to the model's uint8 crops, on CPU tasks without torch (``preprocess``), or on
the model's device inside the actor (``device_preprocess``). Importing the package imports nothing."""
