"""The linear baselines of :mod:`vugen.eval.linear_baselines`, checked against PCA's own identities: all components
reconstruct exactly, the error of ``k`` components is the variance of the others (Eckart-Young), a code is never
better than one with more components, and per-patch PCA reads each patch alone."""

from __future__ import annotations

import numpy as np
import torch

from vugen.eval.linear_baselines import global_pca, patch_pca
from vugen.nn.pixel_decoder import patchify


def _images(count: int, seed: int) -> torch.Tensor:
    """Smooth random images in (0, 1): low-frequency noise upsampled, so PCA has structure to find and no clipping."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False) * 0.8 + 0.1


def test_all_patch_components_reconstruct_exactly():
    train, test = _images(64, 0), _images(8, 1)
    assert torch.allclose(patch_pca(train, test, 4, 48), test, atol=1e-5)


def test_patch_pca_error_is_the_variance_of_the_dropped_components():
    """Coding the training images themselves: the mean squared error per patch value is the sum of the dropped
    eigenvalues of the patch covariance (numpy's eigendecomposition, an independent route) over the patch size."""
    train = _images(64, 0)
    patches = patchify(train, 4).flatten(0, 1).double().numpy()
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(patches, rowvar=False, bias=True)))[::-1]
    for k in (1, 4, 12):
        error = ((patch_pca(train, train, 4, k) - train) ** 2).mean().item()
        assert np.isclose(error, eigenvalues[k:].sum() / patches.shape[1], rtol=1e-4)


def test_more_components_never_code_worse():
    train, test = _images(96, 0), _images(16, 1)
    patch_errors = [((patch_pca(train, test, 4, k) - test) ** 2).mean().item() for k in (1, 2, 4, 8, 16)]
    global_errors = [((global_pca(train, test, k) - test) ** 2).mean().item() for k in (1, 4, 16, 64)]
    assert patch_errors == sorted(patch_errors, reverse=True) and patch_errors[0] > 2 * patch_errors[-1]
    assert global_errors == sorted(global_errors, reverse=True) and global_errors[0] > 2 * global_errors[-1]


def test_per_patch_coding_reads_each_patch_alone():
    train, test = _images(64, 0), _images(4, 1)
    changed = test.clone()
    changed[:, :, :4, :4] = 0.5  # only the first patch
    before, after = patch_pca(train, test, 4, 6), patch_pca(train, changed, 4, 6)
    assert torch.equal(before[:, :, 4:, :], after[:, :, 4:, :]) and torch.equal(before[:, :, :, 4:], after[:, :, :, 4:])
    assert not torch.equal(before[:, :, :4, :4], after[:, :, :4, :4])  # negative control: the patch itself changed
