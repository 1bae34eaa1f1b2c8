"""Reconstruction metrics for the stages' ``test``: PSNR, SSIM, HaarPSI, LPIPS and rFID, synchronised across DDP ranks.

:class:`ReconstructionMetrics` is a :class:`torchmetrics.MetricCollection`: keep it as an attribute of the
LightningModule (it moves with ``.to(device)``), ``update`` it per batch, ``compute`` it once at the end of the
epoch (torchmetrics gathers the state of every rank first) and ``reset`` it.

LPIPS and rFID need pretrained networks that are not shipped with their packages, and nothing here ever
downloads. Their weights come from a local file or from torch's hub cache; without them the metric is skipped
and :attr:`ReconstructionMetrics.skipped` says how to supply them.
"""

from __future__ import annotations

import warnings
from os import PathLike
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lpips
import piq
import torch
import torch.nn.functional as F
from cleanfid.inception_torchscript import InceptionV3W
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance  # torchmetrics.image exports it only with torch-fidelity
from torchmetrics.utilities import rank_zero_warn

__all__ = ["CleanFIDInception", "ReconstructionMetrics"]

# Inputs may overshoot [0, 1] by rounding; anything beyond this is another convention ([-1, 1], [0, 255]).
_RANGE_TOLERANCE = 1e-3
HAARPSI_MIN_SIZE = 16  # HaarPSI's coarsest scale: a 16-tap Haar filter


class _Trunk(NamedTuple):
    file: str  # torchvision's checkpoint file name, as torch's hub cache stores it
    min_size: int  # smallest image side the trunk accepts (measured)


_LPIPS_TRUNKS = {
    "alex": _Trunk("alexnet-owt-7be5be79.pth", 31),
    "vgg": _Trunk("vgg16-397923af.pth", 16),
    "squeeze": _Trunk("squeezenet1_1-b8a52dc0.pth", 17),
}
_TORCHVISION_URL = "https://download.pytorch.org/models/"
_INCEPTION_FILE = "inception-2015-12-05.pt"
_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + _INCEPTION_FILE


class CleanFIDInception(nn.Module):
    """clean-fid's Inception-V3 (the TorchScript port of the TensorFlow FID network): 2048 pool features.

    Takes float images ``[B, 3, H, W]`` in ``[0, 1]``, resizes them to 299x299 with torch's antialiased bicubic
    interpolation and returns ``[B, 2048]``. That resize is close to the PIL one of clean-fid's ``clean`` mode
    (measured mean difference under 0.06 of 255, larger at the borders when upsampling), and the images are not
    quantised to uint8 first: values are comparable with clean-fid's, not identical.

    Args:
        weights: Path to ``inception-2015-12-05.pt``, the file clean-fid downloads from
            https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt;
            clean-fid loads it by that exact name, so it must not be renamed.

    Raises:
        ValueError: If the file has another name.
        FileNotFoundError: If the file does not exist.
    """

    num_features = 2048  # torchmetrics reads this instead of running a dummy image through the network

    def __init__(self, weights: str | PathLike[str]) -> None:
        super().__init__()
        path = Path(weights).expanduser()
        if path.name != _INCEPTION_FILE:
            raise ValueError(f"Inception weights (fid_weights) {str(weights)!r}: the file must be {_INCEPTION_FILE!r}")
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights (fid_weights) {str(weights)!r}: no such file")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
            self.inception = InceptionV3W(str(path.parent), download=False)

    def forward(self, images: Tensor) -> Tensor:
        """Features ``[B, 2048]`` of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        resized = F.interpolate(images, size=(299, 299), mode="bicubic", align_corners=False, antialias=True)
        return self.inception(resized * 255)


class _LPIPS(Metric):
    """Mean LPIPS distance over images, from the ``lpips`` package's network."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, network: lpips.LPIPS, net: str) -> None:
        super().__init__()
        self.network = network
        self.net_name = net
        self.min_size = _LPIPS_TRUNKS[net].min_size
        self.add_state("distance_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the distances of a batch of image pairs in ``[0, 1]``."""
        if min(preds.shape[-2:]) < self.min_size:
            raise ValueError(
                f"LPIPS with lpips_net={self.net_name!r} needs images of at least {self.min_size}x{self.min_size}, got "
                f"{tuple(preds.shape[-2:])}"
            )
        distances = self.network(preds, target, normalize=True)  # [B, 1, 1, 1]; normalize: [0, 1] -> [-1, 1]
        self.distance_sum += distances.sum(dtype=torch.float64)
        self.num_images += distances.numel()

    def compute(self) -> Tensor:
        """Mean distance."""
        return (self.distance_sum / self.num_images).float()


class _HaarPSI(Metric):
    """Mean HaarPSI similarity over images (piq's implementation; no learned weights). Images under
    :data:`HAARPSI_MIN_SIZE` pixels a side are not counted (its coarsest Haar filter would not fit)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("similarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the similarities of a batch of image pairs in ``[0, 1]``."""
        if min(preds.shape[-2:]) < HAARPSI_MIN_SIZE:
            return
        similarity = piq.haarpsi(preds.clamp(0, 1), target.clamp(0, 1), data_range=1.0, reduction="none")
        self.similarity_sum += similarity.sum(dtype=torch.float64)
        self.num_images += similarity.numel()

    def compute(self) -> Tensor:
        """Mean similarity (NaN when no image was large enough)."""
        return (self.similarity_sum / self.num_images).float()


class _RFID(FrechetInceptionDistance):
    """FID between the target images (real) and their reconstructions (fake), updated with both at once."""

    def __init__(self, extractor: nn.Module) -> None:
        # FID sums are float64 already: torchmetrics allocates them so (set_dtype would also cast the extractor).
        super().__init__(feature=extractor, normalize=True)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Add the features of a batch of reconstructions and of their targets."""
        super().update(target, real=True)
        super().update(preds, real=False)

    def compute(self) -> Tensor:
        """FID, or NaN below 2 images per side (the counts are the synchronised ones)."""
        # torchmetrics raises there (no covariance); NaN lets every rank drop rFID alike instead.
        if self.fake_features_num_samples < 2:
            return torch.tensor(float("nan"))
        return super().compute()


def _find_weights(argument: str, given: str | None, file: str) -> Path | None:
    """The weights file: the path given (which must exist), else ``file`` in torch's hub cache, else None."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{argument}={given!r}: no such file")
        return path
    cached = _hub_checkpoints() / file
    return cached if cached.is_file() else None


def _hub_checkpoints() -> Path:
    """Where torch (and torchvision) cache downloaded checkpoints: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _how_to_supply(argument: str, file: str, url: str, alternative: str = "") -> str:
    """How to give a metric its weights offline, in one line."""
    return f"pass {argument}=<path to {file}>{alternative} or put that file in {_hub_checkpoints()} (download: {url})"


def _build_lpips(net: str, weights: Path) -> lpips.LPIPS:
    """The ``lpips`` package's LPIPS network with its trunk loaded from a local torchvision checkpoint.

    Args:
        net: ``"alex"``, ``"vgg"`` or ``"squeeze"``.
        weights: torchvision's ImageNet state dict of that trunk (e.g. ``alexnet-owt-7be5be79.pth``); only its
            ``features.*`` entries are used.

    Returns:
        The network in eval mode, never downloading anything.

    Raises:
        ValueError: If the file lacks one of the trunk's ``features.*`` entries.
    """
    with warnings.catch_warnings():
        # lpips builds its trunk through torchvision's deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        # A random trunk (pnet_rand): lpips would download the ImageNet one. The linear heads ship with lpips.
        network = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # lpips keeps torchvision's `features.<i>` layers in slices: `slice<k>.<i>.*`.
    names = {name: "features." + name.split(".", 1)[1] for name in network.net.state_dict()}
    missing = [key for key in names.values() if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"lpips_weights={str(weights)!r} is not a torchvision {net} state dict: no {missing[0]!r}")
    network.net.load_state_dict({name: state[key] for name, key in names.items()})
    return network


def _check_images(argument: str, images: Any) -> None:
    """Raise unless ``images`` is a float tensor ``[B, 3, H, W]`` in ``[0, 1]``."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`{argument}` must be a tensor [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"`{argument}` must be float in [0, 1], got {images.dtype}")
    low, high = torch.aminmax(images)
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"`{argument}` must hold values in [0, 1], got [{low.item():.4g}, {high.item():.4g}]")


def _omit_from_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: remove the module's entries."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def _keep_own_weights(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: replace the stored entries by the current tensors (loading them is a no-op),
    so a strict load neither misses nor rejects the module's keys."""
    _omit_from_state_dict(module, state_dict, prefix, None)
    for name, child in module.named_children():
        state_dict.update(child.state_dict(prefix=f"{prefix}{name}.", keep_vars=True))


class ReconstructionMetrics(MetricCollection):
    """PSNR, SSIM, LPIPS and rFID of reconstructions against their target images, DDP-synchronised.

    ``compute()`` returns scalar tensors, only for the metrics that are active:

    - ``psnr``: the **mean over images of each image's PSNR**, ``10 log10(1 / MSE_image)`` (what reconstruction
      papers report), not the PSNR of the dataset's MSE. It is not capped: a pixel-identical pair has PSNR +inf,
      and so has the mean.
    - ``ssim``: mean over images of SSIM (Gaussian window 11, sigma 1.5, reflect padding; torchmetrics).
    - ``haarpsi``: mean over images of HaarPSI (Reisenhofer et al. 2018, piq), a perceptual similarity in ``[0, 1]``
      (higher is better) from Haar wavelet responses, with no learned weights, so it is always there; left out for
      images under 16x16.
    - ``lpips``: mean LPIPS distance (the ``lpips`` package, v0.1 heads, ``lpips_net`` trunk; lower is better).
      Needs images of at least 31x31 with AlexNet (17 with SqueezeNet, 16 with VGG).
    - ``rfid``: FID between the targets (real) and the reconstructions (fake), clean-fid's Inception features
      or ``fid_feature_extractor``'s. It needs at least 2 images (with fewer it is left out of the result, with a
      warning) and, like any FID, it is biased high for small sets: compare values at equal image counts.

    LPIPS and rFID use local weights only, never a download: the file given, else the file in torch's hub cache
    (``$TORCH_HOME/hub/checkpoints``, where torchvision and ``torch.hub`` put downloads). Without them the metric
    is skipped and :attr:`skipped` holds one line saying how to supply them (for the caller to print), or with
    ``require_weights`` construction fails.

    The metrics never train (``train()`` keeps them in eval mode, no parameter requires grad) and hold no
    checkpoint state: their networks' weights are left out of ``state_dict()`` and stored entries are ignored
    when loading, so a checkpoint neither grows by them nor depends on which metrics a machine could build.

    Args:
        lpips_weights: torchvision's ImageNet checkpoint of the LPIPS trunk (``alexnet-owt-7be5be79.pth``,
            ``vgg16-397923af.pth`` or ``squeezenet1_1-b8a52dc0.pth``, from https://download.pytorch.org/models/).
            None: look in torch's hub cache.
        lpips_net: LPIPS trunk: ``"alex"`` (the LPIPS authors' recommendation for a metric), ``"vgg"`` or
            ``"squeeze"``.
        fid_weights: clean-fid's ``inception-2015-12-05.pt`` (TorchScript; see :class:`CleanFIDInception`).
            None: look in torch's hub cache.
        fid_feature_extractor: A module from images ``[B, 3, H, W]`` in ``[0, 1]`` to features ``[B, D]``, used
            instead of Inception (e.g. a small network in tests). A ``num_features`` attribute saves torchmetrics
            a dummy 299x299 forward pass.
        require_weights: Raise instead of skipping LPIPS or rFID when their weights are missing.

    Raises:
        FileNotFoundError: If a weights path given does not exist, or weights are missing with
            ``require_weights``.
        ValueError: If ``lpips_net`` is unknown, or both ``fid_weights`` and ``fid_feature_extractor`` are given.
    """

    def __init__(
        self,
        lpips_weights: str | None = None,
        lpips_net: Literal["alex", "vgg", "squeeze"] = "alex",
        fid_weights: str | None = None,
        fid_feature_extractor: nn.Module | None = None,
        require_weights: bool = False,
    ) -> None:
        if lpips_net not in _LPIPS_TRUNKS:
            raise ValueError(f"lpips_net must be one of {sorted(_LPIPS_TRUNKS)}, got {lpips_net!r}")
        if fid_weights is not None and fid_feature_extractor is not None:
            raise ValueError("give fid_weights or fid_feature_extractor, not both")
        metrics: dict[str, Metric] = {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),  # per-image PSNR, then the mean
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            "haarpsi": _HaarPSI(),
        }
        missing: dict[str, tuple[str, str]] = {}  # name -> (label, how to supply the weights)

        trunk = _LPIPS_TRUNKS[lpips_net]
        path = _find_weights("lpips_weights", lpips_weights, trunk.file)
        if path is not None:
            metrics["lpips"] = _LPIPS(_build_lpips(lpips_net, path), lpips_net)
        else:
            missing["lpips"] = ("LPIPS", _how_to_supply("lpips_weights", trunk.file, _TORCHVISION_URL + trunk.file))

        extractor = fid_feature_extractor
        if extractor is None:
            path = _find_weights("fid_weights", fid_weights, _INCEPTION_FILE)
            extractor = CleanFIDInception(path) if path is not None else None
        if extractor is not None:
            metrics["rfid"] = _RFID(extractor)
        else:
            alternative = " (or fid_feature_extractor=<nn.Module>)"
            missing["rfid"] = ("rFID", _how_to_supply("fid_weights", _INCEPTION_FILE, _INCEPTION_URL, alternative))

        if require_weights and missing:
            raise FileNotFoundError(
                "; ".join(f"{label} weights missing (require_weights=True): {how}" for label, how in missing.values())
            )
        super().__init__(metrics, compute_groups=False)
        self._skipped = {name: f"{label} skipped (no weights): {how}" for name, (label, how) in missing.items()}
        self.requires_grad_(False)
        self.train(False)
        self.register_state_dict_post_hook(_omit_from_state_dict)
        self.register_load_state_dict_pre_hook(_keep_own_weights)

    @property
    def skipped(self) -> dict[str, str]:
        """Metrics left out for lack of weights, each with one line saying how to supply them."""
        return dict(self._skipped)

    def update(self, reconstructions: Tensor, images: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch.

        Args:
            reconstructions: Float ``[B, 3, H, W]`` in ``[0, 1]``.
            images: The targets, same shape and range.

        Raises:
            ValueError: If a tensor is not ``[B, 3, H, W]``, holds values outside ``[0, 1]``, or the shapes differ.
            TypeError: If a tensor is not floating point.
        """
        _check_images("reconstructions", reconstructions)
        _check_images("images", images)
        if reconstructions.shape != images.shape:
            raise ValueError(
                f"`reconstructions` {tuple(reconstructions.shape)} and `images` {tuple(images.shape)} differ in shape"
            )
        # In float32 even inside a bf16/fp16 autocast step: SSIM's and the networks' convolutions would not be.
        with torch.autocast(reconstructions.device.type, enabled=False):
            super().update(reconstructions.float(), images.float())

    def compute(self) -> dict[str, Tensor]:
        """The metrics over everything accumulated on all ranks since the last reset.

        Returns:
            ``{"psnr", "ssim"[, "haarpsi"][, "lpips"][, "rfid"]}``: scalar tensors.
        """
        values = super().compute()
        if values["haarpsi"].isnan():
            del values["haarpsi"]  # every image was under HAARPSI_MIN_SIZE
        if "rfid" in values and values["rfid"].isnan():
            del values["rfid"]
            rank_zero_warn("rFID left out: FID needs at least 2 images (a covariance per side).")
        return values

    def train(self, mode: bool = True) -> ReconstructionMetrics:
        """Stay in eval mode whatever ``mode`` says: LPIPS' dropout and Inception's batch norm must never train."""
        return super().train(False)
