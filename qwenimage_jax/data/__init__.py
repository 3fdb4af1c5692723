"""qwenimage_jax.data."""
