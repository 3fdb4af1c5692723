"""One module per CLI command (see qwenimage_jax/cli.py)."""
