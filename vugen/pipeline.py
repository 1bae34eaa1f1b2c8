"""Text to image with a trained latent sampler: :class:`VugenPipeline`, its saved bundle, and ``vugen generate`` /
``vugen export``.

A bundle is one folder, written atomically by :meth:`VugenPipeline.save_pretrained`::

    reducer/  decoder/  sampling.json   the decoder-stage export, as DecoderStage.export writes it
    bridge/                             the latent bridge (LatentBridge.save_pretrained)
    lora/                               a peft adapter folder of the language model's LoRA
    vugen.json                          format version, base VLM (adapter class_path + init args), sampler settings,
                                        sha256 of every weight file
    README.md                           model card

The VLM itself is not copied: it is rebuilt from its recorded ``pretrained`` (and ``revision``). Loading checks every
weight file's tensor names and shapes against its config (safetensors headers, never pickle) before reading it.

Seeds: image ``k`` of prompt ``i`` uses seed ``seed + i * n + k`` (``n`` images per prompt) everywhere (the pipeline
call, ``vugen generate``, the benchmark exporters), so an image does not depend on batching or on the rank count.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils.sha import sha_fileobj
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import Tensor, nn
from torchvision.transforms.v2.functional import to_dtype, to_pil_image
from torchvision.utils import make_grid

import vugen
from vugen.atomic import atomic_directory
from vugen.diffusion import Method
from vugen.nn.latent_bridge import LatentBridge
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer
from vugen.registry import get_adapter_class
from vugen.stages.base import argument_config, full_copy, is_global_zero
from vugen.stages.decoder import SAMPLING_FILE, write_decoder_export
from vugen.stages.sampler import LORA_ADAPTER_NAME, SamplerStage
from vugen_adapters.base import VLMAdapter

__all__ = [
    "BundleError",
    "VugenPipeline",
    "check_weights",
    "export",
    "generate",
    "image_seeds",
    "read_config",
    "resolve_device",
    "sampling_overrides",
    "to_pil",
]

CONFIG_FILE = "vugen.json"
FORMAT, FORMAT_VERSION = "vugen.pipeline", 1
WEIGHTS_FILE = "model.safetensors"  # PyTorchModelHubMixin's file name
LORA_WEIGHTS = "adapter_model.safetensors"  # peft's file name (LoraConfig.save_pretrained writes adapter_config.json)
PEFT_PREFIX = "base_model.model."  # peft's key prefix for an adapter on a bare model (PeftModel -> LoraModel -> model)
_MODULE_FOLDERS = {"reducer": DimensionReducer, "decoder": PixelDecoder, "bridge": LatentBridge}
_BUNDLE_ENTRIES = (*_MODULE_FOLDERS, SAMPLING_FILE, "lora")


class BundleError(ValueError):
    """A bundle folder is incomplete or its weights do not match its configuration."""


class VugenPipeline:
    """Text -> images with a :class:`~vugen.stages.sampler.SamplerStage` (kept in eval mode).

    Generation is the stage's own (:meth:`SamplerStage.generate`): prompt tokens through the VLM's language model
    with LoRA, flow matching in the reducer's latent space, then the pixel decoder.

    Args:
        stage: A trained latent-sampler stage; it is switched to eval mode.
    """

    def __init__(self, stage: SamplerStage) -> None:
        if not isinstance(stage, SamplerStage):
            raise TypeError(f"VugenPipeline needs a SamplerStage, got {type(stage).__name__}")
        self.stage = stage.eval()

    @classmethod
    def from_stage(cls, stage: SamplerStage) -> VugenPipeline:
        """The pipeline of a trained stage (shares its modules; the stage is switched to eval mode)."""
        return cls(stage)

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.stage.image_size

    @property
    def sampling(self) -> dict[str, Any]:
        """The latent sampler's default settings: ``sampler``, ``steps``, ``guidance_scale``, ... ."""
        return dict(self.stage.sampling)

    def to(self, device: str | torch.device) -> VugenPipeline:
        """Move every module to ``device``; returns the pipeline."""
        self.stage.to(device)
        return self

    # ------------------------------------------------------------------ generation
    def __call__(
        self,
        prompts: str | list[str],
        seed: int = 0,
        num_images_per_prompt: int = 1,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: Method | None = None,
    ) -> list[Image.Image]:
        """Generate images, all in one batch.

        Args:
            prompts: A prompt or a list of prompts.
            seed: Image ``k`` of prompt ``i`` uses seed ``seed + i * num_images_per_prompt + k``, i.e. the ``j``-th
                returned image uses ``seed + j``.
            num_images_per_prompt: Images per prompt.
            steps: Flow-matching steps (default: the bundle's).
            guidance_scale: Classifier-free guidance scale (default: the bundle's; 1 = none).
            sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).

        Returns:
            ``len(prompts) * num_images_per_prompt`` RGB images, the images of each prompt next to each other.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = num_images_per_prompt
        seeds = [s for i in range(len(prompts)) for s in image_seeds(seed, i, n)]
        images = self.sample([p for p in prompts for _ in range(n)], seeds, steps, guidance_scale, sampler)
        return to_pil(images)

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: Method | None = None,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``, one per prompt with its own seed (one batch).

        Args:
            prompts: The prompts.
            seeds: One seed per prompt: the image depends only on its prompt, its seed and the settings.
            steps: Flow-matching steps (default: the bundle's).
            guidance_scale: Classifier-free guidance scale (default: the bundle's).
            sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        """
        return self.stage.generate(prompts, seeds, **sampling_overrides(steps, guidance_scale, sampler))

    # ------------------------------------------------------------------ saving
    def config(self) -> dict[str, Any]:
        """The ``vugen.json`` record (without the weight hashes): base VLM and sampler settings."""
        stage, head = self.stage, self.stage.bridge.config
        lora, sampling = stage.lora_config, stage.sampling
        settings = {
            "image_size": stage.image_size,
            "lora_rank": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": lora.lora_dropout,
            "lora_scope": stage.lora_scope,
            "image_attention": stage.image_attention,
            "head": head["head"],
            "head_width": head["head_width"],
            "head_depth": head["head_depth"],
            "sampler": sampling["sampler"],
            "sample_steps": sampling["steps"],
            "guidance_scale": sampling["guidance_scale"],
            "guidance_interval": sampling["guidance_interval"],
            "time_shift": sampling["time_shift"],
        }
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vugen_version": vugen.__version__,
            "adapter": argument_config(stage.adapter),
            "sampler": settings,
        }

    def save_pretrained(self, directory: str | Path) -> Path | None:
        """Write the bundle to ``directory`` atomically (an existing bundle there is replaced whole, or kept on error).

        Under FSDP2 call it on every rank (the bridge and LoRA shards are gathered); only global rank 0 writes.

        Args:
            directory: The bundle folder.

        Returns:
            The folder on the rank that wrote it, else None.
        """
        stage = self.stage
        bridge, lora = full_copy(stage.bridge), _lora_state(stage.adapter.language_model)  # collectives under FSDP2
        if bridge is None or not is_global_zero():
            return None
        record = self.config()
        with atomic_directory(directory) as staging:
            # frozen, never sharded by the sampler stage
            write_decoder_export(staging, stage.reducer, stage.decoder, stage.decoder_sampling)
            bridge.save_pretrained(staging / "bridge")
            _save_lora(staging / "lora", stage, lora)
            record["sha256"] = {
                str(path.relative_to(staging)): _sha256(path) for path in sorted(staging.rglob("*.safetensors"))
            }
            (staging / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
            _model_card(record).save(staging / "README.md")
        return Path(directory)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        adapter_overrides: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> VugenPipeline:
        """Load a bundle written by :meth:`save_pretrained`; the VLM is rebuilt from its recorded ``pretrained``.

        Every weight file is checked (names and shapes, from the safetensors header) against its config before it is
        read; a mismatch raises :class:`BundleError` naming each missing, unexpected and mis-shaped tensor.

        Args:
            directory: The bundle folder.
            adapter_overrides: Replace recorded adapter arguments, e.g. ``{"pretrained": "/local/copy",
                "dtype": "bfloat16"}``.
            trust_remote_code: Let the VLM checkpoint run its own code. Never taken from the bundle.
        """
        directory = Path(directory)
        record = read_config(directory)
        missing = [name for name in _BUNDLE_ENTRIES if not (directory / name).exists()]
        if missing:
            raise BundleError(f"{directory} is an incomplete vugen bundle: missing {', '.join(missing)}")
        for name, module_cls in _MODULE_FOLDERS.items():
            check_weights(directory / name / WEIGHTS_FILE, _expected_shapes(directory / name, module_cls))
        adapter = _build_adapter(record["adapter"], adapter_overrides or {}, trust_remote_code)
        stage = SamplerStage(adapter, decoder_export=str(directory), **record["sampler"])
        _load_bridge(stage.bridge, directory / "bridge")
        _load_lora(stage.adapter.language_model, directory / "lora")
        return cls(stage)


# ---------------------------------------------------------------------------------------------------- bundle parts
def read_config(directory: Path) -> dict[str, Any]:
    """The bundle's ``vugen.json``, checked for its format and version."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a vugen bundle (VugenPipeline.save_pretrained)")
    record = _read_json(path)
    if record.get("format") != FORMAT or not isinstance(record.get("format_version"), int):
        raise BundleError(f"{path}: not a vugen bundle config (expected format {FORMAT!r} and a format_version)")
    if record["format_version"] > FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {record['format_version']} is newer than this vugen reads ({FORMAT_VERSION})"
        )
    absent = [key for key in ("adapter", "sampler") if key not in record]
    if absent:
        raise BundleError(f"{path}: missing {', '.join(absent)}")
    return record


def check_weights(file: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Compare a safetensors file's tensor names and shapes (its header only) with the expected ones.

    Raises:
        FileNotFoundError: The file does not exist.
        BundleError: Naming every missing and unexpected tensor and every shape mismatch.
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    with safe_open(file, "pt") as handle:
        found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    problems = []
    if missing := sorted(expected.keys() - found.keys()):
        problems.append(f"missing tensors {missing}")
    if unexpected := sorted(found.keys() - expected.keys()):
        problems.append(f"unexpected tensors {unexpected}")
    shapes = [
        f"{key}: {list(found[key])} in the file, {list(expected[key])} expected"
        for key in sorted(expected.keys() & found.keys())
        if found[key] != expected[key]
    ]
    if shapes:
        problems.append(f"shape mismatches [{'; '.join(shapes)}]")
    if problems:
        raise BundleError(f"{file} does not match its configuration: {', '.join(problems)}")


def _expected_shapes(folder: Path, module_cls: type[nn.Module]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ``module_cls`` built from ``folder/config.json`` (on the meta device: no memory)."""
    config = _read_json(folder / "config.json")
    try:
        with torch.device("meta"):
            module = module_cls(**config)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{folder / 'config.json'}: not a {module_cls.__name__} config: {error}") from error
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _build_adapter(record: Mapping[str, Any], overrides: Mapping[str, Any], trust_remote_code: bool) -> VLMAdapter:
    adapter_cls = get_adapter_class(record["class_path"])
    accepted = inspect.signature(adapter_cls).parameters
    unknown = sorted(set(overrides) - set(accepted))
    if unknown or "trust_remote_code" in overrides:
        raise ValueError(
            f"adapter_overrides: {unknown or ['trust_remote_code']} not accepted ({adapter_cls.__name__} takes "
            f"{sorted(set(accepted) - {'trust_remote_code'})}; pass trust_remote_code= to from_pretrained)"
        )
    init_args = {**record.get("init_args", {}), **overrides}
    if "trust_remote_code" in accepted:
        init_args["trust_remote_code"] = trust_remote_code  # never the bundle's say
    return adapter_cls(**init_args)


def _load_bridge(bridge: LatentBridge, folder: Path) -> None:
    config = _read_json(folder / "config.json")
    if config != bridge.config:
        raise BundleError(
            f"{folder / 'config.json'} is {config}, but vugen.json and the VLM give the latent bridge {bridge.config}"
        )
    load_model(bridge, folder / WEIGHTS_FILE, strict=True)  # already checked: cannot fail on names or shapes


def _save_lora(folder: Path, stage: SamplerStage, state: dict[str, Tensor]) -> None:
    """A peft adapter folder: ``PeftModel.from_pretrained(language_model, folder)`` loads it."""
    config = copy.deepcopy(stage.lora_config)
    init_args = argument_config(stage.adapter)["init_args"]
    config.base_model_name_or_path, config.revision = init_args.get("pretrained"), init_args.get("revision")
    config.save_pretrained(folder)
    save_file({PEFT_PREFIX + key: value for key, value in state.items()}, folder / LORA_WEIGHTS, {"format": "pt"})


def _load_lora(language_model: nn.Module, folder: Path) -> None:
    expected = get_peft_model_state_dict(language_model, adapter_name=LORA_ADAPTER_NAME)
    check_weights(folder / LORA_WEIGHTS, {PEFT_PREFIX + key: tuple(value.shape) for key, value in expected.items()})
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(folder / LORA_WEIGHTS).items()}
    set_peft_model_state_dict(language_model, state, adapter_name=LORA_ADAPTER_NAME)


def _model_card(record: Mapping[str, Any]) -> ModelCard:
    init_args = record["adapter"]["init_args"]
    data = ModelCardData(
        base_model=init_args.get("pretrained"),
        library_name="vugen",
        pipeline_tag="text-to-image",
        tags=["vugen", "text-to-image", "image-generation", "lora"],
    )
    settings = "\n".join(f"| {key} | {value} |" for key, value in record["sampler"].items())
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# vugen text-to-image bundle\n\n"
        f"Image generation for the VLM `{init_args.get('pretrained')}` (adapter `{record['adapter']['class_path']}`, "
        f"revision `{init_args.get('revision')}`), trained with [vugen](https://arxiv.org/abs/2510.06529): LoRA on "
        f"its language model samples reduced vision latents, a pixel diffusion decoder renders them.\n\n"
        f"```python\nfrom vugen.pipeline import VugenPipeline\n\npipe = VugenPipeline.from_pretrained(BUNDLE)\n"
        f'images = pipe("a large red circle on the left", seed=0)\n```\n\n'
        f"| setting | value |\n|---|---|\n{settings}\n"
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from error


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return sha_fileobj(handle).hex()  # read in chunks: weight files can be large


def _lora_state(language_model: nn.Module) -> dict[str, Tensor]:
    """The LoRA weights by peft name, whole (FSDP2 shards are gathered: a collective) and on the CPU."""
    from torch.distributed.tensor import DTensor

    state = get_peft_model_state_dict(language_model, adapter_name=LORA_ADAPTER_NAME)
    state = {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in state.items()}
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


# ---------------------------------------------------------------------------------------------------- helpers
def image_seeds(seed: int, prompt_index: int, n: int) -> list[int]:
    """Seeds of the ``n`` images of prompt ``prompt_index``: ``seed + prompt_index * n + k``."""
    return [seed + prompt_index * n + k for k in range(n)]


def sampling_overrides(
    steps: int | None = None, guidance_scale: float | None = None, sampler: Method | None = None
) -> dict[str, Any]:
    """The sampler settings that are given (not None), as :meth:`SamplerStage.generate` overrides."""
    given = {"steps": steps, "guidance_scale": guidance_scale, "sampler": sampler}
    return {key: value for key, value in given.items() if value is not None}


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> RGB images (torchvision's float -> uint8 scaling)."""
    return [to_pil_image(to_dtype(image.detach().cpu(), torch.uint8, scale=True)) for image in images]


def resolve_device(device: str | None) -> torch.device:
    """``device``, or the local rank's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _slug(prompt: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def _read_prompts(prompt: str | None, prompts: str | None) -> list[str]:
    if (prompt is None) == (prompts is None):
        raise ValueError(
            "give exactly one of --prompt (one prompt) and --prompts (a text file, one prompt per line), "
            f"got prompt={prompt!r} and prompts={prompts!r}"
        )
    if prompt is not None:
        return [prompt]
    path = Path(prompts)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no such file {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts: {path} holds no prompt (expected one per line)")
    return lines


# ---------------------------------------------------------------------------------------------------- commands
def generate(
    bundle: str,
    out: str,
    prompt: str | None = None,
    prompts: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    sampler: Method | None = None,
    num_images_per_prompt: int = 1,
    batch_size: int = 8,
    device: str | None = None,
) -> list[Path]:
    """`vugen generate BUNDLE OUT --prompt TEXT`: write PNGs of generated images.

    Writes ``OUT/<index:05d>-<slug>-<k>.png`` (image ``k`` of prompt ``index``, seed ``seed + index * n + k``) and
    ``OUT/grid.png`` (one row per prompt when ``num_images_per_prompt > 1``, else rows of 8).

    Args:
        bundle: A bundle folder (``VugenPipeline.save_pretrained``, ``vugen export``).
        out: Output folder (created).
        prompt: One prompt. Give this or ``prompts``.
        prompts: A text file with one prompt per line (blank lines skipped).
        steps: Flow-matching steps (default: the bundle's).
        cfg: Classifier-free guidance scale (default: the bundle's; 1 = none).
        seed: Base seed.
        sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        num_images_per_prompt: Images per prompt.
        batch_size: Images generated together.
        device: Torch device (default: the GPU if there is one, else the CPU).

    Returns:
        The PNG files written, grid last.
    """
    texts = _read_prompts(prompt, prompts)
    if num_images_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"need num_images_per_prompt >= 1 and batch_size >= 1, got {num_images_per_prompt}, {batch_size}"
        )
    pipe = VugenPipeline.from_pretrained(bundle).to(resolve_device(device))
    n, folder = num_images_per_prompt, Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k, text, s) for i, text in enumerate(texts) for k, s in enumerate(image_seeds(seed, i, n))]
    files, images = [], []
    for start in track(range(0, len(jobs), batch_size), description="generating"):
        batch = jobs[start : start + batch_size]
        tensor = pipe.sample([job[2] for job in batch], [job[3] for job in batch], steps, cfg, sampler).cpu()
        for (i, k, text, _), image in zip(batch, to_pil(tensor), strict=True):
            files.append(folder / f"{i:05d}-{_slug(text)}-{k}.png")
            image.save(files[-1])
        images.append(tensor)
    grid = make_grid(torch.cat(images), nrow=n if n > 1 else 8)
    files.append(folder / "grid.png")
    to_pil(grid[None])[0].save(files[-1])
    return files


def export(checkpoint: str, out: str) -> Path | None:
    """`vugen export CKPT OUT`: turn a latent-sampler (SamplerStage) Lightning checkpoint into a bundle.

    The VLM and the decoder export are rebuilt from the configuration recorded in the checkpoint, so they must be
    reachable where this runs.

    Args:
        checkpoint: A ``.ckpt`` written while training ``SamplerStage``.
        out: The bundle folder (replaced atomically).

    Returns:
        The bundle folder.
    """
    stage = SamplerStage.load_from_checkpoint(checkpoint, map_location="cpu")
    return VugenPipeline.from_stage(stage).save_pretrained(out)
