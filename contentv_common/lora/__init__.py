"""LoRA, framework-free: the adapter file, diffusers' LoRA format, merging, training's starting values."""
