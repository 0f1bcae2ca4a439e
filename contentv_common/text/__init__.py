"""Text conditioning, framework-free: the encoders' parameter tables and SD3.5's prompt assembly (333 tokens of width
4096, pooled 2048)."""
