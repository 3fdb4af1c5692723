"""`qwenimage-jax distill --config configs/<name>.py --workdir DIR [--config.key=value ...]`: DMD distillation."""
from __future__ import annotations



def add_arguments(parser):
    parser.add_argument("--config", required=True, help="config file with get_config(); `path.py:arg` passes arg")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard logs and the "
                        "exported student (WORKDIR/export) go here; re-running with the same workdir resumes")
    parser.epilog = ("Any --config.key=value overrides a config field, e.g. --config.teacher=DIR "
                     "--config.data.path=LATENTS --config.fake.updates=5.")


def run(args):
    import logging

    from qwenimage_jax.config_cli import load_config, require_data_path
    from qwenimage_jax.training.distill import distill

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, args.config_overrides)
    if not config.regression.get("pairs", ""):  # a pairs store carries its own data
        require_data_path(config)
    if not config.teacher:
        logging.getLogger("qwenimage_jax").warning("no --config.teacher given: the teacher is RANDOM (smoke test)")
    result = distill(config, args.workdir)
    if result["metrics"]:
        last = result["metrics"][max(result["metrics"])]
        print(f"finished at step {result['final_step']}; dmd loss {last['dmd_loss']:.4g}, "
              f"fake loss {last.get('fake_loss', float('nan')):.4g}")
    if result["export_dir"]:
        print(f"student pipeline written to {result['export_dir']}")
    return 0
