"""Transformer math without a framework: position tables, unpatchifying, the sequence split, FLOPs."""
