"""qwenimage_jax.sampling."""
