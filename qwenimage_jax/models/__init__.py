"""qwenimage_jax.models."""
