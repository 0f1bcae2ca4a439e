"""The narrow model of the scale tests: ContentV's 38 heads and 333 text tokens, at head_dim 8 and two blocks (the last
one context_pre_only), so sharding, padding and sequence splits meet the real model's shapes at CPU cost."""

TEXT, WIDTH, POOLED = 333, 32, 16
NARROW = {
    "num_layers": 2,
    "num_attention_heads": 38,
    "attention_head_dim": 8,
    "hidden_size": 304,
    "joint_attention_dim": WIDTH,
    "pooled_projection_dim": POOLED,
    "sample_size": 16,
    "timestep_channels": 32,
}
