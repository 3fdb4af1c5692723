"""The small world's tokenizer, text encoder and prompt expander (tiny Qwen3-VL-architecture decoders).

  1. BPE tokenizer (`vocab_size` regular tokens) on the world's captions, short prompts and template strings,
     plus Qwen's special tokens and chat template.
  2. Text encoder: next-token pretraining on `pretrain.num_captions` rich captions (train compositions only) in the
     Qwen-Image-2 encoder template, with untied embeddings and linear heads reading every stated scene field from
     the output states (`pretrain.field_weight`; text_lm.field_targets).
  3. Prompt expander: the pretrained model fine-tuned on (short prompt -> rich caption) chats (loss on the answer).

    python -m qwenimage_jax.recipes.world --stage text --workdir /tmp/world    # writes tokenizer/, text_encoder/,
                                                                                 # expander/ under the workdir

Measured (world_build/text_probe.json, written by the stage through `evals.text_probe.report`; on 2 CPU cores
~2 min pretraining + ~2 min expander: world_build/times.json "text"): one changed attribute word moves the state at
the changed token by 0.45 (position, size) to 0.92 (colour) of its norm; a linear probe reads every attribute of
held-out captions at 1.0; attribute words' embeddings have mean pairwise cosines 0.12-0.38. The same model
pretrained on next-token prediction alone with tied embeddings (the encoder that commit 43e7d5c replaced; no JSON
kept) gives 0.03 (size) / 0.045 (count) / 0.067 (background), probe accuracy 0.12-0.49 for all but position,
cosines up to 0.99: the world's attributes are independent and uniform, so predicting the next token never needs
them. Then `--stage text_check` (world_build/text_check.json): a fresh DiT, 150 steps on these states, predicts
sigma = 0.98 latents 0.82 worse from a caption with the background word swapped (on the next-token-only states:
+0.002, commit 25d0c91).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.vocab_size = 768
    c.image_size = 64           # the world resolution the captions come from (no words below 128 px)
    c.model = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, mrope_section=[4, 2, 2], max_position_embeddings=1024,
                   tie_word_embeddings=False)
    # field_weight: the scene-field heads beside next-token prediction (text_lm.field_targets)
    c.pretrain = dict(num_captions=8000, steps=800, batch_size=32, learning_rate=3e-3, warmup_steps=30,
                      field_weight=1.0)
    c.expand = dict(num_pairs=8000, steps=500, batch_size=32, learning_rate=2e-3, warmup_steps=20)
    c.eval_captions = 256       # held-out-composition captions for the reported losses
    if arg in ("test", "smoke"):  # unit tests / the recipe's CI smoke run
        c.model = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, mrope_section=[4, 2, 2], max_position_embeddings=512)
        c.pretrain = dict(num_captions=200, steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=5,
                          field_weight=1.0)
        c.expand = dict(num_pairs=200, steps=10, batch_size=8, learning_rate=1e-3, warmup_steps=2)
        c.eval_captions = 16
    return c
