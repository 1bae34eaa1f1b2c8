"""Linear codes of the same size as a reducer's latents: the baselines a learned reconstruction has to beat.

A reducer with an ``h x w`` token grid of ``d`` channels over ``p x p`` pixel patches stores ``h * w * d`` values per
image. Two linear codes store as many, both fitted by PCA on the training images and scored on held-out ones:

- :func:`patch_pca`: the same token layout. Each ``p x p x 3`` patch is projected onto the ``d`` leading principal
  components of all training patches (one basis shared by every position, as a reducer's weights are).
- :func:`global_pca`: the whole image projected onto its ``h * w * d`` leading components (capped by the number of
  training images), a stronger code that may spend values where the image needs them.

Reconstructions are clipped to ``[0, 1]`` as a decoder's are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vugen.nn.pixel_decoder import patchify, unpatchify

__all__ = ["global_pca", "patch_pca", "pca_basis"]


def pca_basis(rows: Tensor, components: int) -> tuple[Tensor, Tensor]:
    """The mean ``[D]`` and the ``components`` leading principal directions ``[k, D]`` of ``rows`` ``[M, D]``
    (float64; ``k`` capped at ``min(M, D)``)."""
    rows = rows.double()
    mean = rows.mean(0)
    _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    return mean, vh[:components]


def _project(rows: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    return ((rows.double() - mean) @ basis.T) @ basis + mean


def patch_pca(train: Tensor, test: Tensor, patch_size: int, channels: int) -> Tensor:
    """Reconstructions of ``test`` ``[B, 3, H, W]`` from ``channels`` values per ``patch_size`` patch.

    Args:
        train: Training images ``[M, 3, H, W]`` in ``[0, 1]`` (their patches fit the basis).
        test: Images to code, same side.
        patch_size: Side of the pixel patch one token covers.
        channels: Values per token (the reducer's ``latent_dim``).
    """
    grid = (test.shape[-2] // patch_size, test.shape[-1] // patch_size)
    mean, basis = pca_basis(patchify(train, patch_size).flatten(0, 1), channels)
    patches = patchify(test, patch_size)
    coded = _project(patches.flatten(0, 1), mean, basis).reshape(patches.shape)
    return unpatchify(coded.to(test.dtype), patch_size, grid, test.shape[1]).clamp(0, 1)


def global_pca(train: Tensor, test: Tensor, components: int) -> Tensor:
    """Reconstructions of ``test`` ``[B, 3, H, W]`` from its ``components`` leading whole-image components, fitted
    on ``train`` ``[M, 3, H, W]`` (at most ``M`` components exist)."""
    mean, basis = pca_basis(train.flatten(1), components)
    return _project(test.flatten(1), mean, basis).to(test.dtype).reshape(test.shape).clamp(0, 1)
