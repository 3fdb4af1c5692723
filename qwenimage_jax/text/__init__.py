"""qwenimage_jax.text."""
