"""Parity of the Flax Qwen-Image-2 DiT with diffusers `QwenImage21Transformer2DModel` on tiny seeded models.

Each torch model is saved with `save_pretrained` and loaded through `load_transformer`. Covers text-to-image with
and without a padded text mask (batch 2), an editing layout with two condition images of different grids, the
prefix KV cache (extract / cached), and the RoPE tables, token metadata and block-causal mask against the
reference helpers directly.
"""
import numpy as np
import pytest

import torch  # noqa: E402  (a test dependency: pip install -e .[test])

from diffusers import QwenImage21Transformer2DModel  # noqa: E402
from diffusers.models.transformers import transformer_qwenimage21 as ref_lib  # noqa: E402

from qwenimage_jax.models.attention import block_causal_mask  # noqa: E402
from qwenimage_jax.checkpoints import load_transformer  # noqa: E402
from qwenimage_jax.models.dit import JointLayout, layout_key, token_metadata  # noqa: E402
from qwenimage_jax.models.rope import rope_cos_sin, rope_position_ids  # noqa: E402
from tests.conftest import max_rel_err  # noqa: E402

TOL = 1e-4

# Two tiny configs: A is the REFERENCE.md tiny model; B has 3 heads, head_dim 12, 3 layers, in != out channels,
# mlp_ratio 2 and runs layouts with odd latent grids (3x4 target, 5x4 and 4x7 condition images).
CONFIGS = {
    "A": dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, context_in_dim=32, mlp_ratio=3, axes_dims_rope=(4, 6, 6), eps=1e-6,
              causal_condition=True),
    "B": dict(patch_size=1, in_channels=8, out_channels=12, num_layers=3, attention_head_dim=12,
              num_attention_heads=3, context_in_dim=24, mlp_ratio=2, axes_dims_rope=(4, 4, 4), eps=1e-6,
              causal_condition=True),
}
# Per config: target grid, and the edit layout = text runs between two condition images (grid, slots = tokens/4).
LAYOUTS = {
    "A": dict(target=(1, 4, 6), text_len=7, conditions=[(1, 4, 4), (1, 2, 6)], text_runs=[3, 2, 4]),
    "B": dict(target=(1, 3, 4), text_len=6, conditions=[(1, 5, 4), (1, 4, 7)], text_runs=[2, 1, 3]),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    name = request.param
    torch.manual_seed({"A": 0, "B": 1}[name])
    model = QwenImage21Transformer2DModel(**CONFIGS[name]).eval()
    with torch.no_grad():  # move every weight (norm scales included) away from its init value
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(f"dit_{name}")
    model.save_pretrained(path)
    return name, model, load_transformer(str(path))


def t2i_inputs(name, batch=2, seed=0):
    cfg, lay = CONFIGS[name], LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    n_tgt = int(np.prod(lay["target"]))
    hidden = torch.randn(batch, n_tgt, cfg["in_channels"], generator=g)
    text = torch.randn(batch, lay["text_len"], cfg["context_in_dim"], generator=g)
    img_mask = torch.tensor([[False] * lay["text_len"] + [True] * (n_tgt // 4)] * batch)
    return hidden, text, img_mask, [[lay["target"]]] * batch


def edit_inputs(name, batch=2, seed=1):
    """Text with two condition-image slot runs inside it, then the target's slots; condition latents first."""
    cfg, lay = CONFIGS[name], LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    runs, conds = lay["text_runs"], lay["conditions"]
    slots = [int(np.prod(c)) // 4 for c in conds]
    vlm = [False] * runs[0] + [True] * slots[0] + [False] * runs[1] + [True] * slots[1] + [False] * runs[2]
    n_tgt = int(np.prod(lay["target"]))
    n_img = sum(int(np.prod(c)) for c in conds) + n_tgt
    hidden = torch.randn(batch, n_img, cfg["in_channels"], generator=g)
    text = torch.randn(batch, len(vlm), cfg["context_in_dim"], generator=g)
    img_mask = torch.tensor([vlm + [True] * (n_tgt // 4)] * batch)
    return hidden, text, img_mask, [conds + [lay["target"]]] * batch


def padded_mask(img_mask, text_len, pad=2):
    """Sample 0 unpadded, sample 1 with its last `pad` text tokens padded (the pipeline right-pads)."""
    mask = torch.ones(img_mask.shape[0], text_len, dtype=torch.bool)
    mask[1, text_len - pad:] = False
    return mask


def run_both(model, ours, hidden, text, t, shapes, img_mask, mask=None):
    with torch.no_grad():
        ref = model(hidden, text, t, shapes, img_mask, encoder_hidden_states_mask=mask).sample.numpy()
    out = ours(hidden.numpy(), text.numpy(), t.numpy(), shapes, img_mask.numpy(),
               encoder_hidden_states_mask=None if mask is None else mask.numpy())
    return np.asarray(out.sample), ref


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
def test_text_to_image_matches_reference(models, masked):
    name, model, ours = models
    hidden, text, img_mask, shapes = t2i_inputs(name)
    mask = padded_mask(img_mask, text.shape[1]) if masked else None
    out, ref = run_both(model, ours, hidden, text, torch.tensor([0.25, 0.9]), shapes, img_mask, mask)
    assert out.shape == ref.shape == (2, text.shape[1] + hidden.shape[1], model.config.out_channels)
    assert max_rel_err(out, ref) <= TOL


def test_edit_layout_with_two_condition_images_matches_reference(models):
    name, model, ours = models
    hidden, text, img_mask, shapes = edit_inputs(name)
    mask = padded_mask(img_mask, text.shape[1], pad=1)
    out, ref = run_both(model, ours, hidden, text, torch.tensor([0.6, 0.1]), shapes, img_mask, mask)
    assert max_rel_err(out, ref) <= TOL


def test_prefix_kv_extract_and_cached_match_reference(models):
    name, model, ours = models
    hidden, text, img_mask, shapes = edit_inputs(name, seed=3)
    mask = padded_mask(img_mask, text.shape[1], pad=1)
    n_tgt = int(np.prod(shapes[0][-1]))
    cache = ref_lib.QwenImage21KVCache(model.config.num_layers)
    with torch.no_grad():
        ref_extract = model(hidden, text, torch.tensor([0.7, 0.7]), shapes, img_mask,
                            encoder_hidden_states_mask=mask, kv_cache=cache, kv_cache_mode="extract").sample.numpy()
        new_hidden = hidden.clone()
        new_hidden[:, -n_tgt:] = torch.randn(2, n_tgt, hidden.shape[-1])  # a later step: new target latents
        ref_cached = model(new_hidden, text, torch.tensor([0.4, 0.2]), shapes, img_mask,
                           encoder_hidden_states_mask=mask, kv_cache=cache, kv_cache_mode="cached").sample.numpy()
        ref_full = model(new_hidden, text, torch.tensor([0.4, 0.2]), shapes, img_mask,
                         encoder_hidden_states_mask=mask).sample.numpy()

    extract = ours(hidden.numpy(), text.numpy(), np.array([0.7, 0.7]), shapes, img_mask.numpy(),
                   encoder_hidden_states_mask=mask.numpy(), kv_cache_mode="extract")
    assert max_rel_err(extract.sample, ref_extract) <= TOL
    prefix_kv = extract.prefix_kv
    for layer in range(model.config.num_layers):
        ref_k, ref_v = cache.get_layer(layer).get()
        assert max_rel_err(prefix_kv["k"][layer], ref_k.numpy()) <= TOL
        assert max_rel_err(prefix_kv["v"][layer], ref_v.numpy()) <= TOL

    # "cached": only the target latents and no text are needed; the reference's answer is target-only too.
    cached = ours(new_hidden[:, -n_tgt:].numpy(), None, np.array([0.4, 0.2]), shapes, img_mask.numpy(),
                  kv_cache_mode="cached", kv_cache=prefix_kv)
    assert cached.sample.shape == ref_cached.shape == (2, n_tgt, model.config.out_channels)
    assert max_rel_err(cached.sample, ref_cached) <= TOL
    assert max_rel_err(cached.sample, ref_full[:, -n_tgt:]) <= TOL
    # the reference-style call (all latents, text and mask passed again) gives the same answer
    cached_full = ours(new_hidden.numpy(), text.numpy(), np.array([0.4, 0.2]), shapes, img_mask.numpy(),
                       encoder_hidden_states_mask=mask.numpy(), kv_cache_mode="cached", kv_cache=prefix_kv)
    assert max_rel_err(cached_full.sample, ref_cached) <= TOL


def test_without_causal_condition_every_token_uses_its_own_timestep(tmp_path):
    torch.manual_seed(2)
    model = QwenImage21Transformer2DModel(**{**CONFIGS["A"], "causal_condition": False}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    ours = load_transformer(str(tmp_path))
    hidden, text, img_mask, shapes = edit_inputs("A")
    out, ref = run_both(model, ours, hidden, text, torch.tensor([0.3, 0.5]), shapes, img_mask,
                        padded_mask(img_mask, text.shape[1], pad=1))
    assert max_rel_err(out, ref) <= TOL
    with pytest.raises(ValueError, match="causal_condition=True"):
        ours(hidden.numpy(), text.numpy(), np.array([0.3, 0.5]), shapes, img_mask.numpy(), kv_cache_mode="extract")


# ---- reference helpers, compared directly ----------------------------------------------------------------------

HELPER_CASES = {
    # odd x odd grids placed directly in an image mask (the helpers do not need 4-token slots)
    "odd_grids": ([(1, 3, 5), (1, 3, 3), (1, 2, 3)], [2, 15, 3, 9, 1, 6]),
    "t2i": ([(1, 4, 6)], [7, 24]),
    "adjacent_images": ([(1, 2, 2), (1, 1, 3), (1, 4, 4)], [5, 7, 3, 16]),
}


def _image_pad_mask(runs):
    """Alternating text/image run lengths, starting with text."""
    return np.concatenate([np.full(n, i % 2 == 1) for i, n in enumerate(runs)]).astype(bool)


@pytest.mark.parametrize("case", sorted(HELPER_CASES))
def test_rope_table_matches_reference(case):
    shapes, runs = HELPER_CASES[case]
    pad_mask = _image_pad_mask(runs)
    rope = ref_lib.QwenImage21Rope(theta=10000, axes_dim=[4, 6, 6])
    ref = rope(shapes, torch.from_numpy(pad_mask), device="cpu")      # (S, 8) complex64
    ids = rope_position_ids(shapes, pad_mask)
    # exact positions: indexing the reference's own tables with our ids reproduces its output bit for bit
    rebuilt = torch.cat([rope.freqs[axis][torch.from_numpy(ids[:, axis])] for axis in range(3)], dim=-1)
    assert torch.equal(rebuilt, ref)
    cos, sin = rope_cos_sin(ids, (4, 6, 6), xp=np)
    np.testing.assert_allclose(cos, ref.real.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, ref.imag.numpy(), rtol=0, atol=1e-6)


def test_rope_table_matches_reference_at_released_axes():
    shapes, runs = [(1, 64, 64)], [130, 4096]
    pad_mask = _image_pad_mask(runs)
    rope = ref_lib.QwenImage21Rope(theta=10000, axes_dim=[16, 56, 56])
    ref = rope(shapes, torch.from_numpy(pad_mask), device="cpu")
    cos, sin = rope_cos_sin(rope_position_ids(shapes, pad_mask), (16, 56, 56), xp=np)
    np.testing.assert_allclose(cos, ref.real.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, ref.imag.numpy(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("case", sorted(HELPER_CASES))
def test_token_metadata_and_block_causal_mask_match_reference(case):
    shapes, runs = HELPER_CASES[case]
    pad_mask = _image_pad_mask(runs)
    ref_ids, ref_target = QwenImage21Transformer2DModel.build_token_metadata(torch.from_numpy(pad_mask), shapes)
    seq = pad_mask.shape[0]
    key_valid = torch.ones(2, seq, dtype=torch.bool)
    key_valid[1, 1] = False
    block_mask = ref_lib.build_qwenimage21_block_causal_mask(ref_ids, key_valid, 2, torch.device("cpu"))
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    ref_dense = torch.stack([block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q, k) for b in range(2)]).numpy()

    ours_ids, ours_target = token_metadata(pad_mask, shapes)
    np.testing.assert_array_equal(ours_ids, ref_ids.numpy())
    np.testing.assert_array_equal(ours_target, ref_target.numpy())
    ours_dense = block_causal_mask(ours_ids)[None] & key_valid.numpy()[:, None, :]
    np.testing.assert_array_equal(ours_dense, ref_dense)


def test_joint_layout_metadata_matches_reference():
    _, _, img_mask, shapes = edit_inputs("B")
    layout = JointLayout(*layout_key(shapes, img_mask.numpy()))
    ref_pad = torch.repeat_interleave(img_mask[0], torch.where(img_mask, 4, 1)[0])
    ref_ids, ref_target = QwenImage21Transformer2DModel.build_token_metadata(ref_pad, shapes[0])
    np.testing.assert_array_equal(layout.image_pad_mask, ref_pad.numpy())
    np.testing.assert_array_equal(layout.image_ids, ref_ids.numpy())
    np.testing.assert_array_equal(layout.target_mask, ref_target.numpy())


def test_layouts_the_reference_rejects_fail_with_a_readable_error():
    # A 3x5 target needs 15/4 slots: the reference cannot place it, and neither do we, with a reason.
    with pytest.raises(ValueError, match="multiple of 4"):
        JointLayout(*layout_key([(1, 3, 5)], [False] * 4 + [True] * 3)).image_ids
    with pytest.raises(ValueError, match="img_shapes"):
        JointLayout(*layout_key([(1, 2, 2), (1, 4, 4)], [False] * 4 + [True] * 4)).image_ids


def test_jitted_euler_loop_with_cached_prefix_matches_reference_loop(models):
    """The pipeline pattern: step 0 'extract', later steps 'cached' inside one jit + fori_loop (static layout)."""
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.models.dit import DiT

    name, model, ours = models
    hidden, text, img_mask, shapes = edit_inputs(name, seed=5)
    mask = padded_mask(img_mask, text.shape[1], pad=1)
    n_tgt = int(np.prod(shapes[0][-1]))
    sigmas = np.array([1.0, 0.75, 0.4, 0.0], np.float32)
    c_in = hidden.shape[-1]   # config B has more output than input channels: the update uses the first c_in
    with torch.no_grad():  # reference: full forward at every step, no cache
        ref = hidden.clone()
        for i in range(3):
            v = model(ref, text, torch.tensor([sigmas[i]] * 2), shapes, img_mask,
                      encoder_hidden_states_mask=mask).sample[:, -n_tgt:, :c_in]
            ref[:, -n_tgt:] = ref[:, -n_tgt:] + float(sigmas[i + 1] - sigmas[i]) * v

    layout_shapes, layout_mask = layout_key(shapes, img_mask.numpy())
    module = DiT(ours.dit_config)

    @jax.jit
    def sample(params, latents, text_states, text_mask, sig):
        def apply(*args, **kw):
            return module.apply({"params": params}, *args, img_shapes=layout_shapes, img_mask=layout_mask, **kw)

        out, prefix_kv = apply(latents, text_states, sig[0], encoder_hidden_states_mask=text_mask,
                               kv_cache_mode="extract")
        target = latents[:, -n_tgt:] + (sig[1] - sig[0]) * out[:, -n_tgt:, :c_in]

        def step(i, carry):
            v = apply(carry, None, sig[i], kv_cache_mode="cached", kv_cache=prefix_kv)
            return carry + (sig[i + 1] - sig[i]) * v[..., :c_in]

        return jax.lax.fori_loop(1, 3, step, target)

    out = sample(ours.params, jnp.asarray(hidden.numpy()), jnp.asarray(text.numpy()), jnp.asarray(mask.numpy()),
                 jnp.asarray(sigmas))
    assert max_rel_err(out, ref[:, -n_tgt:].numpy()) <= TOL


def test_released_config_has_the_reference_parameter_shapes():
    """configs/dit_7b.py builds (abstractly) exactly the reference's 7.1B parameters, leaf by leaf via the plan."""
    import importlib.util

    import flax.linen as nn

    from qwenimage_jax.checkpoints.dit import dit_plan
    from qwenimage_jax.models.dit import abstract_params, dit_config_from

    spec = importlib.util.spec_from_file_location("dit_7b", "configs/dit_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = dit_config_from(module.get_config())
    with torch.device("meta"):
        reference = QwenImage21Transformer2DModel(**module.get_config().model)
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {tuple(k): v for k, v in
            __import__("flax").traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config))).items()}
    plan = dit_plan(config)
    assert set(plan) == set(ours)
    assert {k for spec in plan.values() for k in spec.keys} == set(ref_shapes)
    for path, leaf in ours.items():
        sizes = [int(np.prod(ref_shapes[k])) for k in plan[path].keys]
        assert int(np.prod(leaf.shape)) == sum(sizes), path
    assert sum(int(np.prod(s)) for s in ref_shapes.values()) == sum(int(np.prod(v.shape)) for v in ours.values())
