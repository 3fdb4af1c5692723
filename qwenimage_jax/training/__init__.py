"""qwenimage_jax.training."""
