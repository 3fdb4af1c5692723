"""The released Qwen-Image-VAE-2.0 f16c64 shape (encoder 96, decoder 144, 5 stages, residual shortcuts, mid
attention kept as in the 2.1 checkpoint), trained from scratch without a discriminator: L1 + LPIPS + KL 0 +
DINOv2-L middle-layer alignment, strict early and relaxed later (REFERENCE.md §5.2, METHODS.md §1).

    qwenimage-jax train-vae --config configs/vae_train_f16c64.py --workdir gs://BUCKET/vae_f16c64 \
        --config.losses.align.path=/data/dinov2-large --config.data.sources.0.dataset=imagenet2012

Pod scale: batch 256 over a (data, fsdp) mesh, bf16 compute with fp32 params, 256 px (then fine-tune at higher
resolutions with more aspect buckets). Data: TFDS imagenet2012 through tfds.data_source (prepared array_record)
plus synthetic text on natural backgrounds. Expect PSNR on ImageNet-256 to approach the report's 32.7 dB only
after a production-length run.
"""
from qwenimage_jax.training.vae import default_config


def get_config(arg=None):
    c = default_config()
    c.total_steps = 200_000
    c.batch_size = 256
    c.compute_dtype = "bfloat16"
    c.remat = True
    c.mesh = dict(data=-1, fsdp=8)
    c.vae = dict(base_dim=96, decoder_base_dim=144, z_dim=64, dim_mult=(1, 2, 4, 8, 8), num_res_blocks=2,
                 is_residual=True, in_channels=3, out_channels=3, mid_attention=True)
    c.data.sources = [dict(name="tfds", dataset="imagenet2012", split="train", image_key="image", weight=0.8),
                      dict(name="synthetic_text", canvas=512, font_sizes=(5, 20), weight=0.2,
                           backgrounds=dict(name="tfds", dataset="imagenet2012", split="train"))]
    c.data.resolution = 256
    c.data.aspect_ratios = (1.0,)
    c.data.num_threads = 16
    c.data.prefetch = 8
    c.optimizer.learning_rate = dict(name="warmup_cosine", peak_value=1e-4, warmup_steps=1000,
                                     decay_steps=199_000, end_value=1e-5)
    c.ema_decay = 0.999
    c.losses.lpips = 1.0
    c.losses.align = dict(aligner="dinov2", path="", layer=12, probe_only=False,
                          weight=dict(name="hold_then_cosine", init_value=1.0, end_value=0.1, hold_steps=40_000,
                                      transition_steps=120_000),
                          m_cos=dict(name="hold_then_cosine", init_value=0.1, end_value=0.5, hold_steps=40_000,
                                     transition_steps=120_000),
                          m_dist=dict(name="hold_then_cosine", init_value=0.05, end_value=0.25, hold_steps=40_000,
                                      transition_steps=120_000))
    c.eval = dict(source=dict(name="tfds", dataset="imagenet2012", split="validation"), resolution=256,
                  crops_per_image=1)
    c.eval_every = 5000
    c.image_every = 1000
    c.checkpoint_every = 2000
    if arg == "vgg":  # no DINOv2 checkpoint at hand: the offline ImageNet VGG16 aligner
        c.losses.align.aligner = "vgg16"
        c.losses.align.layer = "relu5_3"
    return c
