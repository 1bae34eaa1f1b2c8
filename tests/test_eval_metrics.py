"""ReconstructionMetrics against independent references: numpy PSNR, a scipy Gaussian-window SSIM, a scipy
``sqrtm`` Fréchet distance on the same features, and the ``lpips`` package loading its trunk through torchvision.

Weights are random networks saved under the real file names: the metrics' maths and loading paths are checked
without any download.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import lpips
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.multiprocessing as mp
import torchvision
from torch import nn

from vugen.eval import CleanFIDInception, ReconstructionMetrics

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_FILE = "inception-2015-12-05.pt"


@pytest.fixture(autouse=True)
def _empty_torch_home(tmp_path, monkeypatch):
    """Results must not depend on weights this machine happens to hold in its torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory) -> tuple[Path, lpips.LPIPS]:
    """A random torchvision AlexNet checkpoint under its real name, and ``lpips.LPIPS(net="alex")`` built on it
    by lpips and torchvision themselves (they find it in the hub cache of a private TORCH_HOME)."""
    torch_home = tmp_path_factory.mktemp("lpips-torch-home")
    path = torch_home / "hub" / "checkpoints" / ALEXNET_FILE
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), path)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setenv("TORCH_HOME", str(torch_home))
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
        reference = lpips.LPIPS(net="alex", verbose=False)
    return path, reference


def tiny_extractor() -> nn.Module:
    """A small random conv net: images [B, 3, H, W] -> 6 features."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def image_pairs(n: int, seed: int, size: int = 32, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructions, images): random images in [0, 1] and noisy, clamped copies."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=generator)
    reconstructions = (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    return reconstructions, images


def full_metrics(weights: Path) -> ReconstructionMetrics:
    """All four metrics: LPIPS on the given AlexNet file, rFID on the tiny extractor."""
    return ReconstructionMetrics(lpips_weights=str(weights), fid_feature_extractor=tiny_extractor())


def test_psnr_is_the_mean_of_per_image_psnr():
    reconstructions, images = image_pairs(6, seed=0)
    reconstructions[0] = images[0] * 0.5  # one much worse image: per-image mean and dataset-MSE PSNR differ
    metrics = ReconstructionMetrics()
    metrics.update(reconstructions, images)
    values = metrics.compute()

    mse = ((reconstructions.double().numpy() - images.double().numpy()) ** 2).mean(axis=(1, 2, 3))
    assert values["psnr"].shape == ()
    assert values["psnr"].item() == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)
    assert abs(values["psnr"].item() - 10 * np.log10(1 / mse.mean())) > 1.0


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM: Gaussian window sigma 1.5 truncated at radius 5 (11 taps), whole-sample symmetric
    padding (numpy/scipy 'mirror' = torch 'reflect'), C1 = 0.01^2, C2 = 0.03^2, mean over pixels then images."""

    def blur(a: np.ndarray) -> np.ndarray:
        return scipy.ndimage.gaussian_filter(a, sigma=(0, 0, 1.5, 1.5), mode="mirror", truncate=3.5)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(axis=(1, 2, 3)).mean())


def test_ssim_matches_an_independent_gaussian_window_implementation():
    reconstructions, images = image_pairs(4, seed=1, noise=0.2)
    metrics = ReconstructionMetrics()
    metrics.update(reconstructions, images)
    expected = _ssim_reference(reconstructions.double().numpy(), images.double().numpy())
    assert 0.1 < expected < 0.95
    assert metrics.compute()["ssim"].item() == pytest.approx(expected, abs=1e-5)


def test_rfid_matches_the_frechet_distance_of_scipy_sqrtm_on_the_same_features():
    _, images = image_pairs(20, seed=2)
    reconstructions = images**2  # darker: a clearly different feature distribution
    extractor = tiny_extractor()
    metrics = ReconstructionMetrics(fid_feature_extractor=extractor)
    metrics.update(reconstructions, images)
    rfid = metrics.compute()["rfid"]

    with torch.no_grad():
        real, fake = extractor(images).double().numpy(), extractor(reconstructions).double().numpy()
    s_real, s_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(
        s_real + s_fake - 2 * scipy.linalg.sqrtm(s_real @ s_fake).real
    )
    assert rfid.shape == ()
    assert expected > 1e-2
    assert rfid.item() == pytest.approx(expected, rel=1e-6)


def test_lpips_equals_the_lpips_package_on_minus_one_one_inputs(alexnet_weights):
    path, reference = alexnet_weights
    reconstructions, images = image_pairs(4, seed=3)
    metrics = ReconstructionMetrics(lpips_weights=str(path))
    metrics.update(reconstructions, images)
    with torch.no_grad():
        expected = reference(2 * reconstructions - 1, 2 * images - 1)
    assert expected.shape == (4, 1, 1, 1)
    assert metrics.compute()["lpips"].item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_lpips_trunk_is_loaded_from_the_given_file_or_the_hub_cache(alexnet_weights, tmp_path, monkeypatch):
    path, _ = alexnet_weights
    state = torch.load(path, weights_only=True)
    expected = [(state[f"features.{i}.weight"], state[f"features.{i}.bias"]) for i in (0, 3, 6, 8, 10)]  # the convs

    monkeypatch.setenv("TORCH_HOME", str(path.parents[2]))  # the file is also in that hub cache
    for metrics in (ReconstructionMetrics(lpips_weights=str(path)), ReconstructionMetrics()):
        assert "lpips" not in metrics.skipped
        convs = [m for m in metrics["lpips"].network.net.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 5
        for conv, (weight, bias) in zip(convs, expected, strict=True):
            assert torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)


def test_missing_weights_skip_with_one_line_or_raise_when_required(tmp_path):
    metrics = ReconstructionMetrics()
    cache = str(tmp_path / "torch-home" / "hub" / "checkpoints")
    assert set(metrics.skipped) == {"lpips", "rfid"}
    for name, argument, file in (("lpips", "lpips_weights", ALEXNET_FILE), ("rfid", "fid_weights", INCEPTION_FILE)):
        line = metrics.skipped[name]
        assert "\n" not in line and "skipped" in line
        assert argument in line and file in line and cache in line
    metrics.update(*image_pairs(2, seed=4))
    assert set(metrics.compute()) == {"psnr", "ssim", "haarpsi"}  # the weight-free ones

    with pytest.raises(FileNotFoundError, match=rf"require_weights=True.*lpips_weights.*{ALEXNET_FILE}"):
        ReconstructionMetrics(require_weights=True)
    with pytest.raises(FileNotFoundError, match=r"lpips_weights='.*nowhere.pth': no such file"):
        ReconstructionMetrics(lpips_weights=str(tmp_path / "nowhere.pth"))


def test_a_file_that_is_no_trunk_state_dict_is_rejected(tmp_path):
    path = tmp_path / ALEXNET_FILE
    torch.save({"classifier.6.bias": torch.zeros(1000)}, path)
    with pytest.raises(ValueError, match=r"lpips_weights=.* not a torchvision alex state dict: no 'features.0.weight'"):
        ReconstructionMetrics(lpips_weights=str(path))


class _FakeInceptionLayers(nn.Module):
    """clean-fid's TorchScript interface (``layers``, ``forward(x, return_features)``); features: channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ConstantPad1d((0, 2045), 0.0))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fid_weights_route_feeds_cleanfid_inception_299px_images_in_its_range(tmp_path):
    path = tmp_path / INCEPTION_FILE
    torch.jit.script(_FakeInceptionLayers()).save(str(path))
    reconstructions, images = image_pairs(3, seed=5)

    features = CleanFIDInception(path)(images)
    assert features.shape == (3, 2048)
    # clean-fid's network sees (x * 255 - 128) / 128 at 299x299 (it asserts the size); resizing keeps means.
    expected = (images.mean(dim=(2, 3)) * 255 - 128) / 128
    torch.testing.assert_close(features[:, :3], expected, atol=2e-2, rtol=0)
    assert torch.all(features[:, 3:] == 0)

    metrics = ReconstructionMetrics(fid_weights=str(path))
    assert "rfid" not in metrics.skipped
    metrics.update(reconstructions, images)
    assert torch.isfinite(metrics.compute()["rfid"])

    renamed = tmp_path / "inception.pt"
    path.rename(renamed)
    with pytest.raises(ValueError, match=rf"fid_weights.*must be '{INCEPTION_FILE}'"):
        ReconstructionMetrics(fid_weights=str(renamed))
    with pytest.raises(ValueError, match="not both"):
        ReconstructionMetrics(fid_weights=str(renamed), fid_feature_extractor=tiny_extractor())


def test_two_batches_equal_one_batch_of_all_and_reset_forgets(alexnet_weights):
    path, _ = alexnet_weights
    streamed, whole = full_metrics(path), full_metrics(path)
    streamed.update(*image_pairs(5, seed=6, noise=0.4))  # forgotten by the reset below
    streamed.compute()
    streamed.reset()

    reconstructions, images = image_pairs(12, seed=7)
    streamed.update(reconstructions[:5], images[:5])
    streamed.update(reconstructions[5:], images[5:])
    whole.update(reconstructions, images)
    expected = whole.compute()
    values = streamed.compute()
    assert set(values) == {"psnr", "ssim", "haarpsi", "lpips", "rfid"}
    for name, value in values.items():
        assert value.shape == ()
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-5), name


def test_identical_images_give_infinite_psnr_and_perfect_scores(alexnet_weights):
    metrics = full_metrics(alexnet_weights[0])
    _, images = image_pairs(8, seed=8)
    metrics.update(images, images.clone())
    values = metrics.compute()
    assert values["psnr"].item() == float("inf")  # not capped (documented)
    assert values["ssim"].item() == pytest.approx(1.0, abs=1e-6)
    assert values["haarpsi"].item() == pytest.approx(1.0, abs=1e-5)
    assert values["lpips"].item() == pytest.approx(0.0, abs=1e-7)
    assert values["rfid"].item() == pytest.approx(0.0, abs=1e-6)


def test_rfid_is_left_out_with_a_warning_below_two_images():
    metrics = ReconstructionMetrics(fid_feature_extractor=tiny_extractor())
    metrics.update(*image_pairs(1, seed=9))
    with pytest.warns(UserWarning, match="at least 2 images"):
        values = metrics.compute()
    assert set(values) == {"psnr", "ssim", "haarpsi"}


@pytest.mark.parametrize(
    ("reconstructions", "images", "error", "match"),
    [
        (
            torch.rand(3, 32, 32),
            torch.rand(3, 32, 32),
            ValueError,
            r"`reconstructions` must be a tensor \[B, 3, H, W\]",
        ),
        (
            torch.rand(2, 3, 32, 32),
            torch.rand(2, 1, 32, 32),
            ValueError,
            r"`images` must be a tensor \[B, 3, H, W\], got \(2, 1",
        ),
        (torch.rand(2, 3, 32, 32), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "`images` must be float"),
        (torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32), ValueError, r"`reconstructions` .* in \[0, 1\]"),
        (torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 255, ValueError, r"`images` must hold values in \[0, 1"),
        (torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32), ValueError, "differ in shape"),
    ],
)
def test_bad_inputs_are_rejected_naming_the_argument(reconstructions, images, error, match):
    with pytest.raises(error, match=match):
        ReconstructionMetrics().update(reconstructions, images)


def test_lpips_rejects_images_below_its_trunk_minimum(alexnet_weights):
    metrics = ReconstructionMetrics(lpips_weights=str(alexnet_weights[0]))
    with pytest.raises(ValueError, match=r"lpips_net='alex' needs images of at least 31x31, got \(16, 16\)"):
        metrics.update(*image_pairs(2, seed=10, size=16))


def test_results_are_float32_maths_inside_a_bf16_autocast(alexnet_weights):
    reconstructions, images = image_pairs(4, seed=11)
    plain, autocast = full_metrics(alexnet_weights[0]), full_metrics(alexnet_weights[0])
    plain.update(reconstructions, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.update(reconstructions, images)
    expected = plain.compute()
    for name, value in autocast.compute().items():
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-6), name


def test_metrics_never_train_and_stay_out_of_checkpoints(alexnet_weights):
    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.metrics = full_metrics(alexnet_weights[0])

    stage = Stage().train()
    assert not any(module.training for module in stage.metrics.modules())
    assert not any(parameter.requires_grad for parameter in stage.metrics.parameters())
    state = stage.state_dict()
    assert set(state) == {"head.weight", "head.bias"}

    trunk = stage.metrics["lpips"].network.net.slice1[0].weight
    before = trunk.clone()
    stored = {**state, "metrics.lpips.network.net.slice1.0.weight": torch.zeros_like(trunk), "metrics.gone": 1}
    for checkpoint in (stored, state):  # strict: neither the stored extras nor the absent weights are errors
        stage.load_state_dict(checkpoint, strict=True)
        assert torch.equal(trunk, before)


def _ddp_worker(rank: int, world_size: int, port: int, weights: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    reconstructions, images = image_pairs(12, seed=12)
    metrics = full_metrics(Path(weights))
    metrics.update(reconstructions[rank::world_size], images[rank::world_size])
    values = metrics.compute()
    if rank == 0:
        torch.save({name: value.item() for name, value in values.items()}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_compute_the_metrics_of_all_their_images(alexnet_weights, tmp_path):
    """Two gloo processes, each with half the images, report the single-process values of all of them."""
    out = tmp_path / "values.pt"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(alexnet_weights[0]), str(out)), nprocs=2)
    metrics = full_metrics(alexnet_weights[0])
    metrics.update(*image_pairs(12, seed=12))
    expected = {name: value.item() for name, value in metrics.compute().items()}
    values = torch.load(out)
    assert set(values) == set(expected) == {"psnr", "ssim", "haarpsi", "lpips", "rfid"}
    for name in expected:
        assert values[name] == pytest.approx(expected[name], rel=1e-5), name


def test_haarpsi_falls_as_reconstructions_degrade_and_is_the_mean_over_images():
    """More noise, lower HaarPSI; the value of two batches is the mean of each image's (as PSNR's is)."""
    scores = []
    for noise in (0.02, 0.1, 0.3):
        metrics = ReconstructionMetrics()
        reconstructions, images = image_pairs(6, seed=12, noise=noise)
        metrics.update(reconstructions[:2], images[:2])
        metrics.update(reconstructions[2:], images[2:])
        scores.append(metrics.compute()["haarpsi"].item())
        one_by_one = []
        for index in range(6):
            single = ReconstructionMetrics()
            single.update(reconstructions[index : index + 1], images[index : index + 1])
            one_by_one.append(single.compute()["haarpsi"].item())
        assert scores[-1] == pytest.approx(np.mean(one_by_one), rel=1e-5)
    assert 1 > scores[0] > scores[1] > scores[2] > 0


def test_haarpsi_is_left_out_for_images_under_16_pixels():
    metrics = ReconstructionMetrics()
    metrics.update(*image_pairs(2, seed=13, size=8))
    assert "haarpsi" not in metrics.compute() and "psnr" in metrics.compute()
