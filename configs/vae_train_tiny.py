"""Tiny f16c64 VAE trained from scratch on CPU in 500 steps: L1 + LPIPS-VGG + annealed VGG16 alignment, no GAN.

Data: scikit-image's offline photos (18 after holding out two) + synthetic text rendered on them, 64 px crops.
Held-out: random crops of `chelsea` and `coffee`; the honest baseline is bicubic down/up-sampling to the
resolution holding as many floats as the latent (4 x 4 x 64 = 1024 -> about 18 x 18 RGB).

    qwenimage-jax train-vae --config configs/vae_train_tiny.py --workdir /tmp/vae_tiny
    # ablation, same budget, alignment off for the VAE (a linear probe still measures train/align_cosine):
    qwenimage-jax train-vae --config configs/vae_train_tiny.py --workdir /tmp/vae_tiny_noalign \
        --config.losses.align.probe_only=True
    qwenimage-jax eval-vae --vae /tmp/vae_tiny/vae_export --data photos:chelsea,coffee --resolution 64

Watch: tensorboard --logdir /tmp/vae_tiny  (train/*, eval/psnr vs eval/bicubic_baseline_psnr, train/align_cosine,
the alignment weight and margins every step). On CPU a step takes seconds after a one-off compile.

What to expect: this budget does NOT beat the baseline. Held-out PSNR climbs slowly and ends well below bicubic
(23.95 dB, the dashed line in docs/images/vae_tiny_curves.png). The 64 floats are not the limit (a linear
per-16x16-patch PCA with the same floats does better than bicubic on these crops): a from-scratch conv VAE needs
far more steps. The data is scikit-image's photos rather than the package's bundled photos alone (six once
`chelsea` and `coffee` are held out): on so few images a VAE this size learns "which photo" rather than local
structure, and its held-out PSNR falls far below its training PSNR. The peak learning rate is 4e-4 because higher
peaks give gradient spikes at this width.
Ablation at 250 steps each (--config.total_steps=250, eval every 50), drawn in docs/images/vae_tiny_curves.png
(python docs/plot_vae_curves.py --run NAME=WORKDIR ...): alignment lifts the latent-feature cosine
(train/align_cosine) well above the probe-only run's, while held-out PSNR (EMA) and train L1 end about level.
"""
from qwenimage_jax.training.vae import default_config


def get_config(arg=None):
    c = default_config()
    c.total_steps = 500
    c.batch_size = 8
    c.compute_dtype = "float32"            # bf16 is slower than fp32 on CPU
    c.mesh = dict(data=-1, fsdp=1)
    c.vae = dict(base_dim=16, decoder_base_dim=24, z_dim=64, dim_mult=(1, 2, 4, 4, 4), num_res_blocks=1,
                 is_residual=True, in_channels=3, out_channels=3, mid_attention=False)
    # scikit-image's offline photos (18 after holding out chelsea and coffee) + rendered text on them; on the six
    # bundled photos alone the VAE learns "which photo" rather than local structure and does poorly held-out
    c.data.sources = [dict(name="skimage", exclude=["chelsea", "coffee"], weight=1.0),
                      dict(name="synthetic_text", canvas=128, font_sizes=(6, 14), weight=0.3,
                           backgrounds=dict(name="skimage", exclude=["chelsea", "coffee"]))]
    c.data.resolution = 64
    c.data.min_scale = 0.05
    c.data.num_threads = 1
    c.optimizer.learning_rate = dict(name="warmup_cosine", peak_value=4e-4, warmup_steps=30, decay_steps=470,
                                     end_value=1e-4)
    c.ema_decay = 0.99
    c.losses.lpips = 0.1
    c.losses.align.aligner = "vgg16"
    c.losses.align.layer = "relu4_3"     # stride 8: 8 x 8 at 64 px, pooled onto the 4 x 4 latent grid
    c.losses.align.weight = dict(name="hold_then_cosine", init_value=0.5, end_value=0.05, hold_steps=125,
                                 transition_steps=300)
    c.losses.align.m_cos = dict(name="hold_then_cosine", init_value=0.1, end_value=0.5, hold_steps=125,
                                transition_steps=300)
    c.losses.align.m_dist = dict(name="hold_then_cosine", init_value=0.05, end_value=0.25, hold_steps=125,
                                 transition_steps=300)
    c.eval.resolution = 64
    c.eval.crops_per_image = 8
    c.eval_every = 100
    c.image_every = 100
    c.log_every = 10
    c.checkpoint_every = 100
    if arg == "test":   # the unit tests' even smaller f4 model: 32 px, no LPIPS, pixel-patch aligner
        c.vae = dict(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=(1, 2, 2), num_res_blocks=1,
                     is_residual=True, in_channels=3, out_channels=3, mid_attention=False)
        c.batch_size = 4
        c.mesh = dict(data=1, fsdp=1)
        c.optimizer.learning_rate = dict(name="warmup_cosine", peak_value=2e-3, warmup_steps=3, decay_steps=60,
                                         end_value=2e-4)
        c.losses.align.weight = dict(name="hold_then_cosine", init_value=0.5, end_value=0.05, hold_steps=5,
                                     transition_steps=10)
        c.losses.align.m_cos = dict(name="hold_then_linear", init_value=0.1, end_value=0.5, hold_steps=5,
                                    transition_steps=10)
        c.losses.align.m_dist = dict(name="constant", value=0.05)
        c.checkpoint_every = 5
        c.data.sources = [dict(name="photos", exclude=["chelsea", "coffee"])]
        c.data.resolution = 32
        c.data.num_threads = 0
        c.data.prefetch = 0
        c.losses.lpips = 0.0
        c.losses.align.aligner = "patches"
        c.losses.align.stride = 4
        c.eval_every = 0
        c.image_every = 0
        c.async_checkpoint = False
        c.export_ema = False
    return c
