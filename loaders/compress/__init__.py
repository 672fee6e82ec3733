"""The compressor: turns a dense HF model folder into a slimserve checkpoint, method by method."""
