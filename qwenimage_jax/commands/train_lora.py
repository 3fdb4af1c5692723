"""`qwenimage-jax train-lora --config configs/<name>.py --workdir DIR [--config.key=value ...]`."""
from __future__ import annotations

from qwenimage_jax.errors import ConfigError


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="config file with get_config(); `path.py:arg` passes arg")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and export/lora go here; "
                        "re-running with the same workdir resumes")
    parser.epilog = ("Any --config.key=value overrides a config field, e.g. --config.lora.rank=16 "
                     "--config.base=DIR/transformer --config.data.path=LATENTS.")


def run(args):
    import logging
    import os

    from qwenimage_jax.config_cli import load_config, require_data_path
    from qwenimage_jax.training.lora import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, args.config_overrides)
    if not config.base or not os.path.isdir(config.base):
        raise ConfigError(f"config.base is {config.base!r}: point it at the frozen model's transformer/ directory "
                          "(--config.base=DIR/transformer)")
    require_data_path(config)
    result = train(config, args.workdir)
    if result["losses"]:
        print(f"finished at step {result['final_step']}; loss {result['losses'][max(result['losses'])]:.4f}; "
              f"{result['trainable_params']} trainable of {result['base_params']} base parameters; "
              f"adapter: {result['export_dir']}")
    return 0
