"""`qwenimage-jax train-dit --config configs/<name>.py --workdir DIR [--config.key=value ...]`."""
from __future__ import annotations



def add_arguments(parser):
    parser.add_argument("--config", required=True, help="config file with get_config(); `path.py:arg` passes arg")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs go here; "
                        "re-running with the same workdir resumes")
    parser.epilog = "Any --config.key=value overrides a config field, e.g. --config.steps=1000."


def run(args):
    import logging

    from qwenimage_jax.config_cli import load_config, require_data_path
    from qwenimage_jax.training.dit import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, args.config_overrides)
    require_data_path(config)
    result = train(config, args.workdir)
    losses = result["losses"]
    if losses:
        last = max(losses)
        print(f"finished at step {result['final_step']}; loss {losses[last]:.4f}")
    return 0
