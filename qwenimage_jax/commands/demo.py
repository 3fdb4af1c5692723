"""`qwenimage-jax demo [--out out/demo]`: text-to-image with the shipped tiny world model (the README's first command).

Loads `qwenimage_jax/assets/tiny_world/` (a diffusers-format Qwen-Image-2 directory: tiny DiT, VAE, Qwen3-VL text
encoder, trained on the small world, see its README.md) through `QwenImagePipeline.from_pretrained` - the same
path as `qwenimage-jax sample` - and generates, in one batch: world captions of scenes it never saw (some with
held-out shape/colour compositions), and one short casual prompt both as written and after the shipped prompt
expander. Writes `OUT/demo_grid.png` (rows: prompts; columns: the world's own rendering | its VAE reconstruction |
generated | and, for a distilled model, the 40-step CFG teacher on the same prompt and noise) and prints each
prompt's judge score and the mean accuracy.

`--photos NAME ...` runs the earlier VAE-only demo instead (bundled photos through `--vae`, by default the shipped
tiny world VAE, side-by-side grid + PSNR/SSIM in `OUT/reconstructions.png`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenimage_jax.errors import InputError, WeightsNotFoundError
from qwenimage_jax.io_utils import save_image

DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TINY_WORLD_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_world"
WORLD_VAE_DIR = TINY_WORLD_DIR / "vae"  # the photo demo's default VAE: trained on the small world, not on photos

RANDOM_VAE_BANNER = """\
################################################################################################
#  NO TRAINED VAE FOUND: using a RANDOMLY INITIALISED tiny VAE (seed 0).                       #
#  Its reconstructions are not images of the input and its PSNR/SSIM are NOT quality figures;  #
#  they only show that load -> encode -> decode -> metrics runs end to end.                    #
#  Pass --vae PATH (a diffusers AutoencoderKLQwenImage21 dir or a converted one) for real ones. #
################################################################################################"""


def add_arguments(parser):
    parser.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    parser.add_argument("--model", default=None, help=f"model directory (default: {TINY_WORLD_DIR})")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's own grid, sample_sigmas of a distilled student; "
                             "40 for a model without sample_sigmas)")
    parser.add_argument("--num-prompts", type=int, default=6, help="world captions to generate (default 6)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="true CFG scale (negative prompt ' '; default 1 for a distilled model, else 4)")
    parser.add_argument("--transformer", default="transformer",
                        help="transformer subfolder (teacher/transformer: the shipped 40-step teacher)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-teacher", action="store_true",
                        help="skip the 40-step teacher column of a distilled model (teacher/transformer)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "int4"],
                        help="weight-only quantization of the DiT and text encoder, the teacher's too "
                             "(docs/quantization.md)")
    parser.add_argument("--photos", nargs="+", default=None,
                        help="run the VAE-only photo demo on these bundled photos instead")
    parser.add_argument("--vae", default=None, help=f"(photo demo) VAE directory (default: {WORLD_VAE_DIR})")
    parser.add_argument("--size", type=int, default=256, help="(photo demo) square crop size (multiple of 16)")


def random_tiny_vae(seed: int = 0):
    """A seeded random f16 RGBA VAE with the released block structure at a tiny width (~0.6 M params).

    Weights are drawn in numpy from the abstract params (kernels uniform in +-1/sqrt(fan_in), biases 0, norm gains
    1), which avoids compiling the module's init (minutes on 2 CPU cores).
    """
    import flax
    import jax.numpy as jnp

    from qwenimage_jax.models.vae import VAE, QwenImageVAE, VAEConfig, abstract_params

    z_dim = 8
    config = VAEConfig(base_dim=8, decoder_base_dim=12, z_dim=z_dim, dim_mult=(1, 2, 4, 4, 4), num_res_blocks=1,
                       temperal_downsample=(False, True, True, True), in_channels=4, out_channels=4,
                       latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(abstract_params(config)))
    params = {}
    for path in sorted(flat):
        shape = flat[path].shape
        if path[-1] == "kernel":
            limit = 1.0 / np.sqrt(np.prod(shape[:-1]))
            params[path] = jnp.asarray(rng.uniform(-limit, limit, shape), jnp.float32)
        elif path[-1] == "bias":
            params[path] = jnp.zeros(shape, jnp.float32)
        else:  # RMS-norm gains
            params[path] = jnp.ones(shape, jnp.float32)
    return VAE(QwenImageVAE(config), flax.traverse_util.unflatten_dict(params), config.to_diffusers())


def run(args):
    if args.photos is not None:
        return run_photos(args)
    return run_text_to_image(args)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def run_text_to_image(args):
    import time

    from PIL import Image

    from qwenimage_jax.data import judge
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.metrics.image_quality import mean_psnr
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline
    from qwenimage_jax.text.expand import expand_prompts

    t0 = time.time()
    model = str(args.model or TINY_WORLD_DIR)
    if not Path(model, "model_index.json").exists():
        raise WeightsNotFoundError(f"{model!r} is not a model directory (no model_index.json); the tiny "
                                   "world model is built by `python -m qwenimage_jax.recipes.world`")
    pipe = QwenImagePipeline.from_pretrained(model, transformer_subfolder=args.transformer, quantize=args.quantize)
    distilled = pipe.sample_sigmas is not None  # (sampling_defaults clears it for another step count)
    args.steps, args.cfg = eval_t2i.sampling_defaults(pipe, args.steps, args.cfg)
    size = eval_t2i.model_size(model)
    n_held = args.num_prompts // 2
    items = (eval_t2i.world_prompts("train", args.num_prompts - n_held, size)
             + eval_t2i.world_prompts("heldout", n_held, size))
    short_item = eval_t2i.world_prompts("train", 1, size, seed=eval_t2i.EVAL_SEED + 1)[0]
    expander = eval_t2i.load_expander(model)
    short = short_item["short_caption"]
    expanded = expand_prompts(expander, [short])[0]
    print(f"model: {model}")
    print(f"prompt expansion: {short!r}\n                -> {expanded!r}")
    prompts = [r["caption"] for r in items] + [short, expanded]
    records = [r["record"] for r in items] + [short_item["short_record"]] * 2
    truths = [r["image"] for r in items] + [short_item["image"]] * 2
    kinds = ["train composition"] * (len(items) - n_held) + ["held-out composition"] * n_held
    kinds += ["short prompt as written", "short prompt, expanded"]
    t1 = time.time()
    images = eval_t2i.generate(pipe, prompts, args.steps, size, args.cfg, args.seed, batch_size=len(prompts))
    t_gen = time.time() - t1
    teacher_images = None
    teacher_dir = Path(model, "teacher", "transformer")
    if distilled and args.transformer == "transformer" and teacher_dir.is_dir() \
            and not args.no_teacher:
        teacher = QwenImagePipeline.from_pretrained(model, transformer_subfolder="teacher/transformer",
                                                    quantize=args.quantize)
        t2 = time.time()
        teacher_images = eval_t2i.generate(teacher, prompts, 40, size, 4.0, args.seed, batch_size=len(prompts))
        print(f"teacher: 40 steps, CFG 4 ({time.time() - t2:.1f}s incl. compile)")
    truth = np.stack(truths)
    recon = np.asarray(pipe.vae.decode(pipe.vae.encode(truth.astype(np.float32) / 127.5 - 1.0)))
    recon = judge.to_uint8(recon[..., :3])
    scores = [judge.judge(img, rec) for img, rec in zip(images, records)]
    truth_scores = [judge.judge(img, rec) for img, rec in zip(truth, records)]
    teacher_scores = (None if teacher_images is None else
                      [judge.judge(img, rec) for img, rec in zip(teacher_images, records)])
    for i, (prompt, kind, score, gt) in enumerate(zip(prompts, kinds, scores, truth_scores)):
        extra = "" if teacher_scores is None else f", teacher {teacher_scores[i]['overall']:.2f}"
        print(f"[{kind:<24}] judge {score['overall']:.2f}{extra} (ground truth {gt['overall']:.2f})  {prompt}")
    n = len(items)
    gen = judge.summarise(scores[:n])
    gt = judge.summarise(truth_scores[:n])
    print(f"judge accuracy over {n} world captions ({args.steps} steps, CFG {args.cfg}): generated "
          f"{gen['overall']:.3f} (all-correct {gen['all_correct']:.2f}), ground truth {gt['overall']:.3f}")
    if teacher_scores is not None:
        tea = judge.summarise(teacher_scores[:n])
        print(f"teacher (40 steps, CFG 4) on the same captions and noise: {tea['overall']:.3f} "
              f"(all-correct {tea['all_correct']:.2f})")
    print(f"short prompt: as written {scores[n]['overall']:.2f}, expanded {scores[n + 1]['overall']:.2f} "
          "(judged on what the short prompt states)")
    recon_psnr = mean_psnr(truth[:n].astype(np.float32), recon[:n].astype(np.float32), 255.0)
    print(f"VAE reconstruction PSNR on these scenes: {recon_psnr:.2f} dB")
    factor = max(1, 128 // size)  # tiles of at least 128 px
    columns = [truth, recon, images] + ([] if teacher_images is None else [teacher_images])
    rows = [np.concatenate([_upscale(tile, factor) for tile in row], axis=1) for row in zip(*columns)]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "demo_grid.png"
    save_image(Image.fromarray(np.concatenate(rows, axis=0)), target)
    names = "world rendering | VAE reconstruction | generated" + ("" if teacher_images is None else
                                                                  " | teacher, 40 steps")
    print(f"wrote {target} (rows: prompts above; columns: {names})")
    print(f"sampling {t_gen:.1f}s (incl. compile), total {time.time() - t0:.1f}s")
    return 0


def run_photos(args):
    from PIL import Image
    from tqdm import tqdm

    from qwenimage_jax.assets import load_photo, photo_names
    from qwenimage_jax.evals.vae import format_mean, format_row, image_metrics, reconstruct
    from qwenimage_jax.checkpoints import load_vae

    if args.size % 16 or args.size <= 0:
        raise InputError(f"--size {args.size} is not a positive multiple of 16; "
                         f"use {max(16, args.size // 16 * 16)} or {args.size // 16 * 16 + 16}")
    unknown = sorted(set(args.photos) - set(photo_names()))
    if unknown:
        raise InputError(f"unknown photo(s) {', '.join(unknown)}; "
                         f"bundled: {', '.join(photo_names())}")
    if args.vae is not None:
        vae, source = load_vae(args.vae), args.vae
    elif WORLD_VAE_DIR.is_dir():
        vae, source = load_vae(str(WORLD_VAE_DIR)), f"shipped tiny world VAE ({WORLD_VAE_DIR}; trained on the " \
                                                    "small world's scenes, not on photos)"
    else:
        print(RANDOM_VAE_BANNER, flush=True)
        vae, source = random_tiny_vae(), "random tiny VAE (untrained, seed 0)"
    if args.size % vae.spatial_compression:
        raise InputError(f"--size {args.size} is not a multiple of the VAE's compression "
                         f"{vae.spatial_compression}")
    print(f"VAE: {source}; {len(args.photos)} photos at {args.size}x{args.size}")

    rows, lines, grid_rows = [], [], []
    for name in tqdm(args.photos, desc="demo", unit="img"):
        original = load_photo(name, args.size)
        recon = reconstruct(vae, original[None])[0]
        metrics = image_metrics(original, recon)
        rows.append(metrics)
        lines.append(format_row(name, original.shape, metrics))
        grid_rows.append(np.concatenate([original, recon], axis=1))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "reconstructions.png"
    save_image(Image.fromarray(np.concatenate(grid_rows, axis=0)), target)
    print("\n".join(lines))
    print(format_mean(rows))
    print(f"wrote {target} (rows: {', '.join(args.photos)}; columns: original | reconstruction)")
    if args.vae is None and not WORLD_VAE_DIR.is_dir():
        print("reminder: the VAE above is RANDOM (no trained VAE found); the figures are not quality figures.")
    return 0
