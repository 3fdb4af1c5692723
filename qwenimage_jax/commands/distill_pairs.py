"""`qwenimage-jax distill-pairs --config configs/<name>.py --out DIR [--config.key=value ...]`: the precomputed
(noise, teacher solution) pairs that `distill --config.regression.pairs=DIR` regresses to
(training/distill_pairs.py). Re-running with the same --out resumes an interrupted build."""
from __future__ import annotations



def add_arguments(parser):
    parser.add_argument("--config", required=True, help="the distill config file (get_config(); `path.py:arg` "
                        "passes arg): teacher, data.path, regression.teacher_steps / cfg_scale, seed, mesh")
    parser.add_argument("--out", required=True, help="the pairs store to write (or resume); pass it to distill as "
                        "--config.regression.pairs")
    parser.add_argument("--num-pairs", type=int, default=None, help="pairs to solve (default regression.num_pairs)")
    parser.add_argument("--batch", type=int, default=None, help="rows per teacher call (default batch_size)")
    parser.add_argument("--chunk", type=int, default=None, help="rows per resumable chunk, a multiple of --batch "
                        "(default 256 rounded up to one)")
    parser.epilog = ("Any --config.key=value overrides a config field, e.g. --config.teacher=DIR "
                     "--config.data.path=LATENTS --config.regression.teacher_steps=40.")


def run(args):
    import logging

    from qwenimage_jax.config_cli import load_config, require_data_path
    from qwenimage_jax.training.distill_pairs import make_pairs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, args.config_overrides)
    require_data_path(config)
    if not config.teacher:
        logging.getLogger("qwenimage_jax").warning("no --config.teacher given: the teacher is RANDOM (smoke test)")
    manifest = make_pairs(config, args.out, num_pairs=args.num_pairs, batch_size=args.batch, chunk_size=args.chunk,
                          progress=bool(config.get("progress", True)))
    print(f"{manifest['num_pairs']} pairs ({manifest['teacher_steps']} teacher steps, CFG {manifest['cfg_scale']:g}) "
          f"in {args.out}; {manifest['seconds']:.0f} s in all")
    return 0
