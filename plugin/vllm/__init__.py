"""vLLM integration: the ``slimserve`` quantization config and its linear method."""
