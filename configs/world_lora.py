"""LoRA on the small world's teacher: teach it purple backgrounds, a colour it has only ever seen on objects.

Data: 400 scenes of the world's "novel" split (a purple background in every scene, seed 0) plus 400 replayed training
scenes (so the adapter keeps what the teacher already does), encoded by the shipped world VAE and text encoder:

    qwenimage-jax cache-latents --source "world:400:novel:128+world:400:train:128" \
        --vae qwenimage_jax/assets/tiny_world/vae --text-encoder qwenimage_jax/assets/tiny_world/text_encoder \
        --tokenizer qwenimage_jax/assets/tiny_world/processor --out /tmp/world_lora/latents
    qwenimage-jax train-lora --config configs/world_lora.py --workdir /tmp/world_lora/run \
        --config.data.path=/tmp/world_lora/latents
    qwenimage-jax eval-t2i --model qwenimage_jax/assets/tiny_world --transformer teacher/transformer --steps 40 \
        --split novel --num-prompts 64 --lora /tmp/world_lora/run/export/lora

Evaluation prompts are fresh seeds (eval seed 1000) of the novel split, never trained on. Measured figures:
qwenimage_jax/assets/tiny_world/lora_figures.json (written by `python -m qwenimage_jax.recipes.world_lora`) and
docs/lora.md.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.base = "qwenimage_jax/assets/tiny_world/teacher/transformer"
    c.base_dtype = "float32"
    c.quantize = "none"              # QLoRA: "int8" / "fp8" / "int4" stores the frozen base quantized (qwix)
    c.compute_dtype = "float32"
    c.remat = "none"
    c.attention = "xla"
    c.lora = dict(rank=8, alpha=8.0, dropout=0.0,
                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                                  "img_mlp.out", "txt_in.in_layer", "txt_in.out_layer"])
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 32
    c.steps = 300
    c.optimizer = dict(learning_rate=dict(name="warmup_cosine", peak_value=1e-3, warmup_steps=30, decay_steps=300,
                                          end_value=1e-4),
                       b1=0.9, b2=0.99, weight_decay=0.0, grad_clip_norm=1.0)
    # as the teacher was trained (configs/world_dit.py)
    c.flow = dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens")
    c.cfg_dropout = 0.1
    c.data = dict(path="", max_text_tokens=64, seed=0, bucket_weights={})
    c.checkpoint = dict(every=100, keep=1, async_save=False)
    c.log_every = 25
    c.on_nonfinite = "stop"
    c.export = True
    c.progress = True
    if arg == "smoke":
        c.steps, c.batch_size, c.log_every = 2, 4, 1
        c.optimizer.learning_rate.update(warmup_steps=1, decay_steps=2)
    return c
