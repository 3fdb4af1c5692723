"""Flow-matching Euler schedule of Qwen-Image (diffusers `FlowMatchEulerDiscreteScheduler` as the Qwen-Image
pipelines drive it), as pure functions.

    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)   # linear, not clamped
    sigmas, timesteps = flow_match_sigmas(num_steps, image_seq_len, scheduler_config, sigmas=None)
        sigmas:    (num_steps + 1,) float32, the last one the terminal 0
        timesteps: (num_steps,) float32 = sigmas[:-1] * num_train_timesteps (what the DiT reads, divided by 1000)
    latents = euler_step(latents, velocity, sigma, sigma_next)   # x + (sigma_next - sigma) * v in float32

The grid follows the pipeline: `sigmas` (the caller's, e.g. a Turbo `sample_sigmas` grid) or
`linspace(1, 1/n, n)`, then the scheduler's shift (exponential/linear time shift with `mu` when
`use_dynamic_shifting`, otherwise the static `shift`), then the stretch to `shift_terminal`. The arithmetic runs
in numpy float32 in the reference's order, so the values agree with diffusers to float32 rounding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

# the values of Qwen/Qwen-Image-2.1's scheduler_config.json, defined with the pipeline-directory writer
from qwenimage_jax.checkpoints.pipeline_dir import QWEN_IMAGE_SCHEDULER_CONFIG


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers `FlowMatchEulerDiscreteScheduler` config that shape the sampling grid.

    Defaults are the diffusers class defaults (what a config.json that omits a field means); the Qwen-Image values
    are `QWEN_IMAGE_SCHEDULER_CONFIG`.
    """
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    stochastic_sampling: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type={self.time_shift_type!r}; use 'exponential' or 'linear'")
        unsupported = [name for name in ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas",
                                         "use_exponential_sigmas", "use_beta_sigmas") if getattr(self, name)]
        if unsupported:
            raise ValueError(f"scheduler options {unsupported} are not supported by the Qwen-Image sampler (its "
                             "released config sets them all to false); set them to false")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> "SchedulerConfig":
        """A diffusers scheduler config dict (extra keys such as `_class_name` ignored; None -> class defaults)."""
        if isinstance(config, SchedulerConfig):
            return config
        config = dict(config or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        # diffusers reads `base_shift`/`max_shift` = None as "no value"; keep the class defaults then.
        return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "shift_terminal"})


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of the dynamic time shift: linear in the image token count through (base_seq_len, base_shift) and
    (max_seq_len, max_shift), not clamped (the pipelines' `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def mu_for(image_seq_len: int, config: SchedulerConfig) -> float:
    """`calculate_shift` with the scheduler config's values, as QwenImage21Pipeline calls it."""
    return calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                           config.max_shift)


def qwen_image_mu(image_seq_len: int) -> float:
    """`mu_for` with the released Qwen-Image scheduler config (what training shifts its sigmas with)."""
    return mu_for(image_seq_len, SchedulerConfig.from_dict(QWEN_IMAGE_SCHEDULER_CONFIG))


def _time_shift(config: SchedulerConfig, mu: float, sigmas: np.ndarray) -> np.ndarray:
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return mu / (mu + (1 / sigmas - 1) ** 1.0)


def flow_match_sigmas(num_steps: int | None, image_seq_len: int, config: Mapping[str, Any] | SchedulerConfig | None,
                      sigmas: Sequence[float] | None = None, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The sampling grid for `num_steps` steps at `image_seq_len` target tokens.

    sigmas: optional custom grid (without the terminal 0); its length sets the number of steps and `num_steps` may
      be None. mu: override the resolution shift (default: from `image_seq_len` and the config).
    Returns (sigmas (n + 1,) float32 ending in 0, timesteps (n,) float32 = sigmas[:-1] * num_train_timesteps).
    """
    config = SchedulerConfig.from_dict(config)
    if sigmas is None:
        if num_steps is None or int(num_steps) < 1:
            raise ValueError(f"num_steps={num_steps!r}; pass a positive number of steps or an explicit `sigmas` grid")
        num_steps = int(num_steps)
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    grid = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if grid.size == 0:
        raise ValueError("sigmas is empty; pass at least one sigma (without the terminal 0)")
    if not np.all((grid > 0) & (grid <= 1)):
        raise ValueError(f"sigmas must lie in (0, 1] (the terminal 0 is appended for you), got {grid.tolist()}")
    if grid.size > 1 and not np.all(np.diff(grid) < 0):
        i = int(np.argmax(np.diff(grid) >= 0))
        raise ValueError(f"sigmas must be strictly decreasing (noise at 1 towards the image at 0), but sigmas[{i}] = "
                         f"{grid[i]} is followed by {grid[i + 1]}; got {grid.tolist()}")
    grid = grid.astype(np.float32)
    if config.use_dynamic_shifting:
        if mu is None:
            mu = mu_for(image_seq_len, config)
        grid = _time_shift(config, mu, grid)
    else:
        grid = config.shift * grid / (1 + (config.shift - 1) * grid)
    # the terminal stretch maps the last sigma to shift_terminal; with ONE sigma that is 0/0 (diffusers returns
    # NaN sigmas for num_inference_steps=1 and samples black images), so a one-step grid is left as it is
    if config.shift_terminal and len(grid) > 1:
        one_minus = 1 - grid
        scale = one_minus[-1] / (1 - config.shift_terminal)
        grid = 1 - (one_minus / scale)
    grid = np.asarray(grid, dtype=np.float32)
    timesteps = (grid * np.float32(config.num_train_timesteps)).astype(np.float32)
    full = np.concatenate([grid, np.zeros((1,), np.float32)])
    return full, timesteps


def model_timesteps(timesteps: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """What the pipeline hands the DiT: `timestep / 1000` in float32 (one rounding away from sigma)."""
    return (np.asarray(timesteps, np.float32) / np.float32(num_train_timesteps)).astype(np.float32)


def euler_step(latents, velocity, sigma, sigma_next):
    """One flow-matching Euler step x + (sigma_next - sigma) * v: the sample is upcast to float32, the increment
    takes the velocity's dtype (torch's 0-dim promotion) and the result is cast back to the velocity's dtype, as
    diffusers' `step` does. numpy or jax arrays; sigma/sigma_next float32 scalars."""
    xp = np if isinstance(latents, np.ndarray) and isinstance(velocity, np.ndarray) else jnp
    velocity = xp.asarray(velocity)
    dt = xp.asarray(sigma_next, xp.float32) - xp.asarray(sigma, xp.float32)
    increment = (dt * velocity.astype(xp.float32)).astype(velocity.dtype).astype(xp.float32)
    return (xp.asarray(latents).astype(xp.float32) + increment).astype(velocity.dtype)
