"""What the zoo's PyTorch comparisons share (tests/models/test_zoo*.py): the input a PyTorch
network is fed, and the error measure. Imports no torch itself (the tests' `torch` fixture)."""
import numpy as np


def standardized_nchw(torch, images, mean, std):
    """What the PyTorch loaders feed a network: [0, 1] NHWC images normalised, as NCHW."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(((images - mean) / std).transpose(0, 3, 1, 2)))


def relative_error(found, expected) -> float:
    """The largest absolute difference over the largest expected magnitude."""
    return float(np.max(np.abs(np.asarray(found) - expected)) / np.max(np.abs(expected)))
