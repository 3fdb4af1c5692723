"""`qwenimage-jax sample --model PATH --prompt "..." --out out.png`: text-to-image / editing with a Qwen-Image-2
model directory (diffusers format, components optionally converted to Orbax).

    qwenimage-jax sample --model Qwen-Image-2.1 --prompt "a red fox in snow" --steps 40 --seed 0 --out fox.png
    qwenimage-jax sample --model Qwen-Image-2.1 --prompt "make it night" --image day.png --out night.png
    qwenimage-jax sample --model Qwen-Image-2.1 --prompt "..." --batch 4 --cfg 4 --negative-prompt " " --out grid.png
    qwenimage-jax sample --model DIR --config configs/sampling.py:turbo --prompt "..." --out t.png

Several `--prompt`s form one batch; `--batch N` draws N images per prompt. One image is written as is; more are
tiled into a grid PNG (`--save-individual` also writes out-0.png, out-1.png, ...). Every PNG carries the prompt,
negative prompt, seed, steps, guidance and size as text metadata. An existing --out is never overwritten unless
`--overwrite`: the PNG goes to out_2.png, out_3.png, ... (claimed atomically, so several processes writing to one
folder never clobber each other) and each file appears complete or not at all (written aside, then renamed).
A size or batch whose estimated peak memory exceeds what the device has free is refused before anything
compiles, naming the largest square size and batch that fit (`sampling/memory.py`; `--no-memory-check` skips it).
`--steps` left out runs a distilled model's own grid (model_index.json sample_sigmas), else the preset's steps. A tqdm bar counts the denoising steps (from a host
callback inside the one jitted loop); `--no-progress` removes it. Flags override the `--config` preset.

Batch sampling from a prompt file (instead of --prompt/--out):

    qwenimage-jax sample --model DIR --prompts-file prompts.jsonl --out-dir out/ --batch-size 4

one JSON object a line: {"prompt": "...", "seed": 7, "height": 768, "width": 1344, "negative_prompt": "..."}
(only `prompt` is required; a missing seed is --seed + line - 1, a missing size or negative prompt the command's).
Every line is checked before the model loads (a bad one is an error naming the file, line and key). Lines are
grouped by prompt-length bucket, size and CFG and sampled in batches of --batch-size over the data-parallel
devices of --mesh; each image is exactly the one `sample --prompt P --seed S` gives alone (same flags), written
atomically as out/<line>-<key>.png when its batch finishes, and recorded in out/manifest.jsonl (prompt, seed,
settings, file). A rerun skips the lines the manifest lists as done (file present, same settings). The tqdm bar
counts images and shows images/s. Details: qwenimage_jax/sampling/batch.py, docs/gpu_sampling.md.
"""
from __future__ import annotations

import os
import time

from qwenimage_jax.errors import InputValueError


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="diffusers-format Qwen-Image-2 directory")
    parser.add_argument("--transformer", default="transformer",
                        help="transformer subfolder of --model (e.g. teacher/transformer in the shipped tiny_world)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="LoRA adapter (diffusers/peft/kohya directory or .safetensors) with an optional weight; "
                             "repeat to combine several")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text; repeat the flag for a batch of prompts (or use --prompts-file)")
    parser.add_argument("--image", nargs="+", default=None, help="condition image(s) for editing (up to 10)")
    parser.add_argument("--out", default=None, help="output PNG path (a grid when more than one image)")
    parser.add_argument("--prompts-file", default=None, metavar="FILE.jsonl",
                        help="batch sampling: one JSON object a line with prompt and optional seed, height, width, "
                             "negative_prompt; images go to --out-dir with a manifest.jsonl, and a rerun skips what "
                             "is done")
    parser.add_argument("--out-dir", default=None, help="output folder of --prompts-file (images + manifest.jsonl)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="--prompts-file: images per batch, a multiple of the mesh's data x fsdp (default: "
                             "that product, 1 without --mesh); lines are grouped by prompt bucket, size and CFG")
    parser.add_argument("--config", default=None, help="sampling preset, e.g. configs/sampling.py:turbo")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (preset: 40)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=None, help="custom sigma grid (no terminal 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise seed (--prompts-file: the seed of line 1, line n gets seed + n - 1 unless it "
                             "has one)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--cfg", type=float, default=None, help="true CFG scale (>1 with a negative prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for CFG")
    parser.add_argument("--height", type=int, default=None, help="output height (multiple of 32)")
    parser.add_argument("--width", type=int, default=None, help="output width (multiple of 32)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default side length and condition-image area side (preset: 1024)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--attention", default=None,
                        help="DiT attention backend: auto (default: cudnn on GPU, splash on TPU, xla on CPU), xla, "
                             "cudnn, splash, dot_product_attention")
    parser.add_argument("--quantize", default=None, choices=["none", "int8", "fp8", "int4"],
                        help="weight-only quantization of the DiT and text encoder (docs/quantization.md; "
                             "preset: none)")
    parser.add_argument("--mesh", default=None,
                        help="device mesh, e.g. 'data=-1' (all devices data-parallel) or 'data=2,fsdp=4'")
    parser.add_argument("--grid-cols", type=int, default=None, help="grid columns (default ~sqrt(n))")
    parser.add_argument("--save-individual", action="store_true", help="also write each image separately")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--executable", default=None, metavar="FILE",
                        help="run the sampling loop saved by `qwenimage-jax aot --program sample --save FILE` "
                             "instead of compiling it; it serves the one shape it was compiled for (batch, size, "
                             "prompt bucket, CFG, dtype) and draws no per-step progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (default: write out_2.png, out_3.png, ... beside it)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="skip the check that refuses a size/batch whose estimated peak memory exceeds what the "
                             "device has free (sampling/memory.py)")


def _settings(args):
    """The preset (configs/sampling.py or its `base` defaults) with the command-line flags applied."""
    import importlib.util

    if args.config:
        from qwenimage_jax.config_cli import load_config
        config = load_config(args.config)
    else:
        path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sampling.py")
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location("_sampling_presets", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            config = module.get_config("base")
        else:  # installed without the configs folder
            import ml_collections
            config = ml_collections.ConfigDict(dict(steps=40, cfg=1.0, negative_prompt="", resolution=1024,
                                                    height=0, width=0, dtype="bfloat16", attention="auto",
                                                    mesh=dict(data=1, fsdp=1, tensor=1)))
    out = dict(config)
    for flag, key in (("steps", "steps"), ("cfg", "cfg"), ("negative_prompt", "negative_prompt"),
                      ("resolution", "resolution"), ("height", "height"), ("width", "width"), ("dtype", "dtype"),
                      ("attention", "attention"), ("quantize", "quantize")):
        value = getattr(args, flag)
        if value is not None:
            out[key] = value
    return out


def _mesh(spec: str | None, settings: dict):
    from qwenimage_jax.parallel.mesh import make_mesh

    sizes = dict(settings.get("mesh") or {})
    if spec:
        sizes = {}
        for item in spec.split(","):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in ("data", "fsdp", "tensor"):
                raise InputValueError(f"--mesh item {item!r}; use data=N, fsdp=N, tensor=N (one may be -1)")
            sizes[name.strip()] = int(value)
    if all(int(v) == 1 for v in sizes.values()):
        return None
    return make_mesh(data=int(sizes.get("data", 1)), fsdp=int(sizes.get("fsdp", 1)),
                     tensor=int(sizes.get("tensor", 1)))


def _check_mode(args):
    """Exactly one of --prompt/--out and --prompts-file/--out-dir, with the flags that go with it."""
    if args.prompts_file is None:
        missing = [flag for flag, value in (("--prompt", args.prompt), ("--out", args.out)) if not value]
        if missing:
            raise InputValueError(f"{' and '.join(missing)} missing; pass --prompt TEXT --out FILE.png, or "
                                  "--prompts-file FILE.jsonl --out-dir DIR for batch sampling")
        for flag, value in (("--out-dir", args.out_dir), ("--batch-size", args.batch_size)):
            if value is not None:
                raise InputValueError(f"{flag} goes with --prompts-file; with --prompt use --out (and --batch for "
                                      "images per prompt)")
        return
    if not args.out_dir:
        raise InputValueError("--prompts-file needs --out-dir DIR (the images and manifest.jsonl go there)")
    for flag, value in (("--prompt", args.prompt), ("--out", args.out), ("--image", args.image)):
        if value:
            raise InputValueError(f"{flag} cannot be combined with --prompts-file (prompts, seeds and sizes come from "
                                  "the file; editing is not batched from a file)")
    if args.batch != 1:
        raise InputValueError(f"--batch {args.batch} with --prompts-file; each line is one image (repeat a line with "
                              "another seed for more), and --batch-size sets the batch")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputValueError(f"--batch-size {args.batch_size}; it must be >= 1")
    if args.save_individual or args.grid_cols is not None or args.overwrite:
        raise InputValueError("--save-individual, --grid-cols and --overwrite are for --out; --prompts-file writes "
                              "each image to --out-dir and a rerun skips what the manifest says is done")


def _load_pipeline(args, settings, mesh):
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    if args.executable is not None and not os.path.isfile(args.executable):
        raise InputValueError(f"--executable {args.executable!r} does not exist; write it with `qwenimage-jax aot "
                              f"--config CONFIG --program sample --save {args.executable}` (or drop --executable)")
    dtype = getattr(jnp, settings["dtype"])
    runtime = {"attention": settings.get("attention") or "auto"}  # auto: cuDNN on GPU, splash on TPU, else xla
    start = time.perf_counter()
    pipe = QwenImagePipeline.from_pretrained(args.model, dtype=dtype, mesh=mesh, transformer_subfolder=args.transformer,
                                             quantize=settings.get("quantize"), **runtime)
    if args.lora:
        names, weights = [], []
        for i, spec in enumerate(args.lora):
            path, _, weight = spec.rpartition(":") if ":" in spec and not os.path.exists(spec) else (spec, "", "1")
            names.append(pipe.load_lora_weights(path, adapter_name=f"lora_{i}"))
            weights.append(float(weight or 1.0))
        pipe.set_adapters(names, weights)
    if args.executable is not None:
        pipe.use_executable(args.executable)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s on {jax.device_count()} device(s)")
    return pipe


def run(args):
    from PIL import Image

    from qwenimage_jax.sampling import images as image_utils

    _check_mode(args)
    settings = _settings(args)
    if args.batch < 1:
        raise InputValueError(f"--batch {args.batch}; it must be >= 1")
    from qwenimage_jax.sampling.checks import MAX_STEPS
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise InputValueError(f"--steps {args.steps}; use 1 to {MAX_STEPS} (leave it out to run a distilled "
                              "model's own grid)")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputValueError(f"--{flag} {value}; it must be a positive multiple of 32 (leave it out for the "
                                  "default)")
    if args.prompts_file is not None:
        return run_prompts_file(args, settings)
    mesh = _mesh(args.mesh, settings)
    pipe = _load_pipeline(args, settings, mesh)
    condition = [Image.open(p) for p in args.image] if args.image else None
    if condition is not None:
        for img in condition:
            img.load()
    negative = settings.get("negative_prompt") or None
    prompts = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    # --steps wins; without it a distilled model runs its own grid and any other the preset's step count
    steps = args.steps if args.steps is not None else (None if pipe.sample_sigmas else int(settings["steps"]))
    if args.sigmas:
        steps = None
    start = time.perf_counter()
    result = pipe(prompt=prompts, image=condition, negative_prompt=negative, true_cfg_scale=float(settings["cfg"]),
                  height=settings.get("height") or None, width=settings.get("width") or None,
                  num_inference_steps=steps, sigmas=args.sigmas, num_images_per_prompt=args.batch,
                  output_resolution=int(settings["resolution"]), seed=args.seed, output_type="pil",
                  progress=not args.no_progress, memory_check=not args.no_memory_check)
    images = result.images
    elapsed = time.perf_counter() - start
    metadata = {"prompt": " | ".join(args.prompt), "negative_prompt": negative or "", "seed": args.seed,
                "steps": len(args.sigmas or pipe.sample_sigmas) if steps is None else steps,
                "true_cfg_scale": settings["cfg"],
                "size": f"{images[0].size[0]}x{images[0].size[1]}", "model": os.path.abspath(args.model),
                "images": len(images), "generator": "qwenimage-jax"}
    if args.image:
        metadata["condition_images"] = " | ".join(args.image)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    picture = images[0] if len(images) == 1 else image_utils.make_grid(images, args.grid_cols)
    out = args.out if args.overwrite else claim_output_path(args.out)
    if out != args.out:
        print(f"{args.out} exists; writing {out} instead (--overwrite replaces it)")
    save_png_atomic(picture, out, metadata)
    if args.save_individual and len(images) > 1:
        stem, ext = os.path.splitext(out)
        for i, img in enumerate(images):
            save_png_atomic(img, f"{stem}-{i}{ext or '.png'}", dict(metadata, index=i))
    print(f"wrote {out}: {len(images)} image(s) {metadata['size']} in {elapsed:.1f}s "
          f"({elapsed / len(images):.2f}s per image, including compilation on the first call)")
    return 0


def run_prompts_file(args, settings) -> int:
    """`--prompts-file FILE --out-dir DIR`: see qwenimage_jax/sampling/batch.py."""
    from qwenimage_jax.sampling import batch as batch_sampling

    resolution = int(settings["resolution"])
    height = int(settings.get("height") or 0) or resolution
    width = int(settings.get("width") or 0) or resolution
    cfg = float(settings["cfg"])
    entries = batch_sampling.read_prompts_file(
        args.prompts_file, seed=args.seed, height=height, width=width,
        negative_prompt=settings.get("negative_prompt") or None, cfg=cfg)
    mesh = _mesh(args.mesh, settings)
    parts = 1
    if mesh is not None:
        shape = dict(zip(mesh.axis_names, mesh.devices.shape))
        parts = int(shape.get("data", 1)) * int(shape.get("fsdp", 1))
    batch_size = parts if args.batch_size is None else args.batch_size
    if batch_size % parts:
        raise InputValueError(f"--batch-size {batch_size} is not a multiple of the mesh's data x fsdp = {parts} "
                              f"(the batch is split over them); use {parts * max(1, round(batch_size / parts))}")
    # everything that decides an image besides its line: a change samples the line again on a rerun
    image_settings = {"model": os.path.abspath(args.model), "transformer": args.transformer, "lora": args.lora,
                      "steps": args.steps, "preset_steps": int(settings["steps"]), "sigmas": args.sigmas,
                      "cfg": cfg, "resolution": resolution, "dtype": settings["dtype"],
                      "quantize": settings.get("quantize") or "none"}
    entries = batch_sampling.with_keys(entries, image_settings)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        from qwenimage_jax.errors import OutputError
        raise OutputError(f"cannot create --out-dir {args.out_dir!r}: {e.strerror}") from None
    manifest = batch_sampling.Manifest(args.out_dir)
    unique, seen = [], set()
    for entry in entries:
        if entry.key not in seen:
            seen.add(entry.key)
            unique.append(entry)
    todo = [e for e in unique if not manifest.done(e)]
    notes = [f"{len(entries)} line(s) in {args.prompts_file}", f"{len(unique) - len(todo)} already done in "
             f"{manifest.path}"]
    if len(unique) < len(entries):
        notes.append(f"{len(entries) - len(unique)} duplicate(s) sampled once")
    if manifest.unreadable:
        notes.append(f"{manifest.unreadable} unreadable manifest line(s) ignored")
    print("; ".join(notes))
    if not todo:
        print(f"nothing to sample: every image is in {args.out_dir}")
        return 0
    pipe = _load_pipeline(args, settings, mesh)
    steps = args.steps if args.steps is not None else (None if pipe.sample_sigmas else int(settings["steps"]))
    if args.sigmas:
        steps = None
    metadata = {"steps": len(args.sigmas or pipe.sample_sigmas) if steps is None else steps,
                "true_cfg_scale": settings["cfg"], "model": os.path.abspath(args.model), "generator": "qwenimage-jax"}
    start = time.perf_counter()
    written = batch_sampling.run(pipe, todo, manifest, prompts_file=args.prompts_file, batch_size=batch_size,
                                 cfg=cfg, steps=steps, sigmas=args.sigmas, resolution=resolution,
                                 settings=image_settings, metadata=metadata, progress=not args.no_progress,
                                 memory_check=not args.no_memory_check)
    elapsed = time.perf_counter() - start
    print(f"wrote {written} image(s) to {args.out_dir} in {elapsed:.1f}s ({written / elapsed:.3g} images/s, "
          f"including compilation); manifest: {manifest.path}")
    return 0


def claim_output_path(path: str) -> str:
    """`path`, or the first free `stem_2.ext`, `stem_3.ext`, ... beside it, created empty with O_EXCL so that two
    processes can never pick the same name."""
    stem, ext = os.path.splitext(path)
    for n in range(1, 100_000):
        candidate = path if n == 1 else f"{stem}_{n}{ext}"
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path} and 99,999 numbered variants exist; choose another --out")


def save_png_atomic(image, path: str, metadata: dict) -> None:
    """Writes the PNG beside `path` under a private name and renames it into place (readers never see half a
    file; a crash leaves at most a stray .tmp file)."""
    from qwenimage_jax.io_utils import atomic_path
    from qwenimage_jax.sampling import images as image_utils

    with atomic_path(path) as tmp:
        image_utils.save_png(image, tmp, metadata)
