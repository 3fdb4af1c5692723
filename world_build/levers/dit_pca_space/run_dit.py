"""Train the world DiT on WORKDIR/latents to each target step (resuming), export EMA, judge on validation."""
import sys, os, json, time, logging
from qwenimage_jax.recipes.world import stages
from qwenimage_jax.recipes import world_validation
from qwenimage_jax.models.dit import dit_config_from
from qwenimage_jax.training.dit import export_params, train
from qwenimage_jax.evals.vae_readout import write_result
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
workdir = sys.argv[1]; targets = [int(t) for t in sys.argv[2].split(",")]
overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
for target in targets:
    out = f"transformer_{target}"
    if os.path.exists(os.path.join(workdir, out, "config.json")):
        continue
    cfg = stages._config("world_dit"); cfg.data.path = os.path.join(workdir, "latents"); cfg.steps = target; cfg.progress = True
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path: node = node[p]
        node[last] = v
    t0 = time.time()
    result = train(cfg, os.path.join(workdir, "dit"))
    stages._export_dit(export_params(result["state"]), dit_config_from(cfg), os.path.join(workdir, out), int(result["final_step"]))
    t1 = time.time()
    r = world_validation.validation_judge(workdir, out)
    r["train_seconds"] = round(t1 - t0, 1); r["loss"] = stages._last_loss(result)
    write_result(r, os.path.join(workdir, f"judge_{target}.json"))
    print("JUDGE", target, "train", r["train"], "heldout", r["heldout"], flush=True)
