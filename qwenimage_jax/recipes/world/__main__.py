"""`python -m qwenimage_jax.recipes.world`: the world recipe's command line (`qwenimage_jax.recipes.world.main`)."""
import sys

from qwenimage_jax.recipes.world import main

if __name__ == "__main__":
    sys.exit(main())
