"""qwenimage_jax.metrics."""
