"""cache-latents: world scenes -> VAE latents + text states in ArrayRecord shards, equal to encoding them directly."""
import numpy as np

from qwenimage_jax import cli
from qwenimage_jax.data import latent_records
from qwenimage_jax.data.cache_latents import iter_source
from qwenimage_jax.testing.tokenizer import build_tiny_tokenizer, special_token_ids
from tests.qwen3_vl_tiny import build_reference


def _tiny_vae(path):
    import torch
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2, 2],
                                   num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True, True],
                                   is_residual=True, in_channels=4, out_channels=4,
                                   latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0])
    vae.save_pretrained(path)
    return path


def test_cache_latents_writes_what_the_encoders_give(tmp_path):
    from qwenimage_jax.checkpoints import load_text_encoder
    from qwenimage_jax.checkpoints import load_vae

    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    _, te_path = build_reference(str(tmp_path), "tied_gqa2", special_token_ids(tok))
    vae_path = _tiny_vae(str(tmp_path / "vae"))
    out = str(tmp_path / "cache")
    assert cli.main(["cache-latents", "--source", "world:6:train:64", "--vae", vae_path, "--text-encoder", te_path,
                     "--tokenizer", tok, "--out", out, "--shards", "2", "--batch", "4"]) == 0
    meta = latent_records.load_meta(out)
    assert sum(meta["shards"].values()) == 6 and list(meta["buckets"]) == ["4x4|none|"]
    assert latent_records.load_null_text_embeds(out).shape[1] == 64

    vae, te = load_vae(vae_path), load_text_encoder(te_path, tokenizer_path=tok)
    pairs = list(iter_source("world:6:train:64"))
    batch = latent_records.iterate(latent_records.bucketed_batches(out, 6, max_text_tokens=160))
    got = next(batch)
    # records come shuffled: match them by their latents
    for image, caption in pairs:
        x = np.concatenate([image / 127.5 - 1.0, np.ones(image.shape[:2] + (1,))], -1)[None].astype(np.float32)
        want = np.asarray(vae.encode(x, normalize=True))[0]
        i = int(np.argmin([np.abs(l - want).max() for l in got["latents"]]))
        np.testing.assert_allclose(got["latents"][i], want, atol=2e-3, rtol=2e-3)   # stored as float16
        embeds, _, _ = te.encode_prompt([caption])
        n = int(got["text_mask"][i].sum())
        np.testing.assert_allclose(got["text_embeds"][i, :n], np.asarray(embeds)[0, :n], atol=1e-2, rtol=1e-2)


def test_an_interrupted_dataset_write_leaves_no_dataset_and_a_rerun_completes(tmp_path):
    """The example stream fails after 5 of 12 examples (a crash, a full disk): no shard under its final name, no
    meta.json (so nothing reads the directory as a dataset) and no temporary left; the rerun writes it whole."""
    import os

    import pytest

    from qwenimage_jax.errors import InputNotFoundError
    from tests.dit_train_fixtures import make_examples

    def failing():
        for i, example in enumerate(make_examples(12)):
            if i == 5:
                raise OSError(28, "No space left on device")
            yield example

    out = tmp_path / "latents"
    with pytest.raises(OSError, match="No space"):
        latent_records.write_dataset(failing(), str(out), num_shards=2)
    assert os.listdir(out) == []
    with pytest.raises(InputNotFoundError):
        latent_records.load_meta(str(out))
    meta = latent_records.write_dataset(make_examples(12), str(out), num_shards=2)
    assert sum(meta["shards"].values()) == 12 and sorted(os.listdir(out)) == sorted(list(meta["shards"]) + ["meta.json"])
    batch = next(latent_records.iterate(latent_records.bucketed_batches(str(out), 4, max_text_tokens=12)))
    assert batch["latents"].shape[0] == 4
