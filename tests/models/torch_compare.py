"""What the zoo's PyTorch comparisons share (tests/models/test_zoo*.py): the input a PyTorch
network is fed, the error measure, and the eval-mode comparison of a converted network. Imports
no torch itself (the tests' `torch` fixture)."""
import jax
import jax.numpy as jnp
import numpy as np

from models.resnet import ResNetOutput


def standardized_nchw(torch, images, mean, std):
    """What the PyTorch loaders feed a network: [0, 1] NHWC images normalised, as NCHW."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(((images - mean) / std).transpose(0, 3, 1, 2)))


def relative_error(found, expected) -> float:
    """The largest absolute difference over the largest expected magnitude."""
    return float(np.max(np.abs(np.asarray(found) - expected)) / np.max(np.abs(expected)))


def assert_matches_pytorch(torch, model, variables, torch_model, images, normalization, tolerance):
    """The converted `model` (eval mode) gives PyTorch's logits and pooled features on `images`
    ([0, 1] NHWC, standardised by `normalization` = (mean, std) for PyTorch), within a relative
    `tolerance`; its pooled features are the mean of its feature map."""
    forward = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    out = forward.lower(variables, images).compile()(variables, images)
    with torch.no_grad():
        torch_pooled, torch_logits = torch_model(standardized_nchw(torch, images, *normalization))
    assert isinstance(out, ResNetOutput) and out.logits.dtype == jnp.float32
    assert relative_error(out.logits, torch_logits.numpy()) < tolerance
    assert relative_error(out.pooled, torch_pooled.numpy()) < tolerance
    np.testing.assert_allclose(np.mean(out.feature_map, axis=(1, 2)), out.pooled, rtol=1e-5, atol=1e-6)
