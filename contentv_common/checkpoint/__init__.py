"""Checkpoints on disk: safetensors I/O, the parameter table, formats, conversion, integrity, the run lock."""
