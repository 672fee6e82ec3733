"""Hooks for models run by transformers itself: bidirectional and SparseD attention for diffusion LMs."""
