"""Transformer math without a framework: position tables, the sequence split, FLOPs."""
