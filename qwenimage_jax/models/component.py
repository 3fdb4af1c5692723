"""The one type every loaded component shares (`checkpoints.load(kind, path)` returns a subclass of it)."""
from __future__ import annotations

from typing import Any


class Component:
    """A loaded model: `.module` (its Linen module), `.params` (the unboxed params tree), `.config` (the
    reference's config dict, i.e. what its config.json holds) and `.model_config` (the typed config the module
    was built from). Subclasses add the model's own entry points (encode/decode, __call__, generate, ...)."""
    module: Any
    params: Any
    config: dict

    @property
    def model_config(self) -> Any:
        return getattr(self.module, "config", self.config)
