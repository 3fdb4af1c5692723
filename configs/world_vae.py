"""The small world's shipped VAE: a tiny f16 residual VAE (widths 16/24, z_dim 16) trained from scratch on 64 px world scenes.

Mid-block attention stays on (diffusers' AutoencoderKLQwenImage21 always has it, so the export loads there).
Plain L1 + L2 reconstruction (the scenes are flat colours; no LPIPS, no alignment, so no pretrained network is
needed) plus `salient_l1`: L1 over the pixels that stand out from the image's background, which are a few percent
of a scene. The first recipe (widths 8/12, 300 steps, no salient term) painted the background alone and lost every
object (judge 0.12 on its reconstructions: background 1.0, objects 0.0). At this width peak learning rates of 3e-3 (diverged), 1.5e-3 (L1 oscillating around 0.3-0.5) and 6e-4 (L1 0.10 at step 60, then gradient spikes and 0.2-0.35 for hundreds of steps) are too high. The EMA weights
are exported in diffusers format to WORKDIR/vae_export.

    qwenimage-jax train-vae --config configs/world_vae.py --workdir /tmp/world/vae
    qwenimage-jax eval-vae --vae /tmp/world/vae/vae_export --data world --resolution 64

Driven end to end (with the other tiny models) by `python -m qwenimage_jax.world_assets`.
"""
from qwenimage_jax.training.vae import default_config

RESOLUTION = 64


def get_config(arg=None):
    c = default_config()
    c.seed = 0
    c.total_steps = 900
    c.batch_size = 8
    c.compute_dtype = "float32"            # bf16 is slower than fp32 on CPU
    c.mesh = dict(data=1, fsdp=1)
    c.vae = dict(base_dim=16, decoder_base_dim=24, z_dim=16, dim_mult=(1, 2, 2, 2, 2), num_res_blocks=1,
                 is_residual=True, in_channels=3, out_channels=3, mid_attention=True)
    # 20% of the world's compositions never appear in any training data (split="train"); full scenes, no crops.
    c.data.sources = [dict(name="world", length=20_000, seed=1, size=RESOLUTION, split="train", weight=1.0)]
    c.data.resolution = RESOLUTION
    c.data.min_scale = 1.0
    c.data.max_scale = 1.0
    c.data.ratio_jitter = 1.0
    c.data.flip = False
    c.data.num_threads = 1
    c.optimizer.learning_rate = dict(name="warmup_cosine", peak_value=3e-4, warmup_steps=50, decay_steps=850,
                                     end_value=3e-5)
    c.ema_decay = 0.99
    c.losses = dict(l1=1.0, l2=1.0, lpips=0.0, kl=0.0, sample_posterior=False, salient_l1=1.0, salient_threshold=0.35)
    c.losses.align = dict(aligner="none", layer="", weight=dict(name="constant", value=0.0),
                          m_cos=dict(name="constant", value=0.0), m_dist=dict(name="constant", value=0.0))
    c.eval = dict(source=dict(name="world", length=64, seed=7, size=RESOLUTION, split="heldout"),
                  resolution=RESOLUTION, crops_per_image=1)
    c.eval_every = 300
    c.image_every = 0
    c.log_every = 20
    c.checkpoint_every = 300
    c.keep_checkpoints = 1
    c.async_checkpoint = False
    return c
