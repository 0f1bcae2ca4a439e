"""The Wan2.1 causal 3D VAE, framework-free: config, parameter table, checkpoint, chunking."""
