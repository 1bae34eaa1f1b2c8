"""The bundle of :class:`~vugen.pipeline.VugenPipeline`: writing, validating and loading it.

A **bundle** is one folder, written atomically by :func:`save_bundle` (``VugenPipeline.save_pretrained``)::

    reducer/  decoder/  sampling.json   the decoder-stage export (:mod:`vugen.decoder_export`)
    bridge/                             the latent bridge (LatentBridge.save_pretrained)
    lora/                               the language model's LoRA: adapter_model.safetensors (peft's keys),
                                        scoped_lora_config.json (its peft LoraConfig, under a name peft does not
                                        look for) and README.md (what it is, how to load it)
    vugen.json                          format version, base VLM (adapter class_path + init args, and its content
                                        fingerprint), the latent sampler's config, its SamplingConfig, sha256 of
                                        every other file but the card
    README.md                           model card

The VLM itself is not copied: it is rebuilt from its recorded ``pretrained`` (and ``revision``). A Hub id or an
absolute path is recorded as it was given; a relative local folder is recorded relative to the bundle folder (e.g.
``../tiny-llava``) and read back against it, so the bundle loads from any working directory and keeps working when
the bundle and the VLM move together. ``vlm`` holds the VLM's content fingerprint
(:func:`vugen.fingerprint.vlm_fingerprint`).

Loading (:func:`load_bundle`) first checks every recorded file's sha256 (a changed, truncated or half-copied file is
named), then every weight file's tensor names and shapes against its config (safetensors headers, never pickle),
then the VLM's content fingerprint (before loading it, when it is on disk), and only then reads weights. Unknown
keys in the latent sampler's config or the sampling settings are errors naming the key.

The LoRA acts only on the BOI and latent tokens (``lora_scope: image_tokens``, the default): loaded with plain peft
(``PeftModel.from_pretrained``) it would act on every token and change the VLM's answers. So its folder holds no
``adapter_config.json``: peft finds no adapter there and raises, and ``lora/README.md`` says how to load it.

Versions: 4 names the LoRA config ``lora/scoped_lora_config.json`` (peft's ``adapter_config.json`` before) and adds
``lora/README.md``; 3 splits the record into ``latent_sampler`` (:class:`~vugen.generation.LatentSampler`'s
constructor arguments) and ``sampling`` (a :class:`~vugen.generation.SamplingConfig`, ``solver`` for the ODE
choice); 2 added the VLM's fingerprint, the bundle-relative ``pretrained`` and the sha256 of the config files.
Bundles of versions 1 to 3 still load. A version 3 bundle as it is: the LoRA is built from ``vugen.json`` and no
LoRA config file is read. Versions 1 and 2 (one ``sampler`` record; ``sampler`` for the ODE choice, also in
``sampling.json``) have their records translated (version 1: ``pretrained`` as recorded, from the working directory;
weight files' sha256 checked; no VLM check). Nothing here imports training code: loading a bundle builds modules,
never a LightningModule.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.utils.sha import sha_fileobj
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import CONFIG_NAME as PEFT_CONFIG_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import Tensor, nn

import vugen
from vugen.adapter import VLMAdapter
from vugen.atomic import atomic_directory
from vugen.decoder_export import SAMPLING_FILE, read_decoder_export, write_decoder_export
from vugen.distributed import full_copy, is_global_zero
from vugen.errors import VugenError
from vugen.fingerprint import describe_fingerprint, fingerprint_differences, vlm_fingerprint
from vugen.finite import require_finite
from vugen.generation import LORA_ADAPTER_NAME, LatentSampler, LatentSamplerConfig, SamplingConfig
from vugen.model_card import lora_readme, model_card
from vugen.nn.latent_bridge import LatentBridge
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer
from vugen.registry import adapter_class_from_record

if TYPE_CHECKING:
    from vugen.pipeline import VugenPipeline

__all__ = [
    "CONFIG_FILE",
    "BundleError",
    "BUNDLE_FILES",
    "CARD_FILE",
    "bundle_record",
    "check_bundle_files",
    "check_weights",
    "load_bundle",
    "read_config",
    "save_bundle",
    "sha256_of",
]

CONFIG_FILE = "vugen.json"
CARD_FILE = "README.md"  # the model card: not hashed, free to edit (the Hub's is written on push)
FORMAT, FORMAT_VERSION = "vugen.pipeline", 4
WEIGHTS_FILE = "model.safetensors"  # PyTorchModelHubMixin's file name
LORA_WEIGHTS = "adapter_model.safetensors"  # peft's file name
# The LoRA's peft config, under a name peft does not read: plain peft would apply the LoRA to every token
LORA_CONFIG = "scoped_lora_config.json"
PEFT_PREFIX = "base_model.model."  # peft's key prefix for an adapter on a bare model (PeftModel -> LoraModel -> model)
_MODULE_FOLDERS = {"reducer": DimensionReducer, "decoder": PixelDecoder, "bridge": LatentBridge}
_BUNDLE_ENTRIES = (*_MODULE_FOLDERS, SAMPLING_FILE, "lora")
# What a bundle is made of, as glob patterns (a Hub download fetches these, not whatever else the repo holds)
BUNDLE_FILES = (CONFIG_FILE, CARD_FILE, SAMPLING_FILE, *(f"{folder}/*" for folder in (*_MODULE_FOLDERS, "lora")))
# Versions 1 and 2 recorded one "sampler" object: the stage's arguments, the ODE choice as "sampler"
_LEGACY_SAMPLING = {"sampler": "solver", "sample_steps": "steps", "guidance_scale": "guidance_scale"}
_LEGACY_SAMPLING |= {"guidance_interval": "guidance_interval", "time_shift": "time_shift"}


class BundleError(VugenError, ValueError):
    """A bundle folder is incomplete or its weights do not match its configuration."""


# ---------------------------------------------------------------------------------------------- bundle
def bundle_record(pipeline: VugenPipeline) -> dict[str, Any]:
    """The ``vugen.json`` record of ``pipeline`` (without the weight hashes and the VLM fingerprint): base VLM,
    the latent sampler's constructor arguments and the sampling settings."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vugen_version": vugen.__version__,
        "adapter": pipeline.latent_sampler.adapter.init_config(),
        "latent_sampler": pipeline.latent_sampler.record(),
        "sampling": pipeline.sampling.to_dict(),
    }


def save_bundle(
    pipeline: VugenPipeline, directory: str | Path, agree: Callable[[bool], bool] | None = None
) -> Path | None:
    """Write the bundle of ``pipeline`` to ``directory`` atomically (an existing bundle there is replaced whole, or
    kept on error).

    Under FSDP2 call it on every rank (the bridge and LoRA shards are gathered); only global rank 0 writes.

    Args:
        pipeline: The pipeline (e.g. ``SamplerStage.pipeline()`` after training).
        directory: The bundle folder.
        agree: ``decision -> decision of all ranks`` for the finiteness check under several processes (e.g.
            ``trainer.strategy.reduce_boolean_decision``), so every rank raises or none does.

    Returns:
        The folder on the rank that wrote it, else None.

    Raises:
        NonFiniteError: A weight (LoRA, bridge, reducer, decoder) holds NaN or Inf; nothing is written.
    """
    sampler = pipeline.latent_sampler
    lora_local = get_peft_model_state_dict(sampler.adapter.language_model, adapter_name=LORA_ADAPTER_NAME)
    weights = {
        **{f"lora.{key}": value for key, value in lora_local.items()},
        **sampler.bridge.state_dict(prefix="bridge."),
        **pipeline.reducer.state_dict(prefix="reducer."),
        **pipeline.decoder.state_dict(prefix="decoder."),
    }
    require_finite(weights.items(), f"refusing to write the bundle {directory}", agree=agree)
    bridge, lora = full_copy(sampler.bridge), _gathered(lora_local)  # collectives under FSDP2
    if bridge is None or not is_global_zero():
        return None
    record = _with_vlm_fingerprint(bundle_record(pipeline), Path(directory))
    with atomic_directory(directory) as staging:
        # frozen, never sharded by the sampler stage
        write_decoder_export(staging, pipeline.reducer, pipeline.decoder, pipeline.decoder_sampling)
        bridge.save_pretrained(staging / "bridge")
        _save_lora(staging / "lora", sampler, lora)
        # every file written so far: all but vugen.json (which holds the hashes) and the model card (free to edit)
        files = sorted(path for path in staging.rglob("*") if path.is_file())
        record["sha256"] = {str(path.relative_to(staging)): sha256_of(path) for path in files}
        (staging / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        model_card(record, pipeline.decoder_sampling).save(staging / CARD_FILE)
    return Path(directory)


def load_bundle(
    directory: str | Path, adapter_overrides: Mapping[str, Any] | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """The components (``VugenPipeline(**components)``) of a bundle written by :func:`save_bundle`.

    The VLM is rebuilt from its recorded ``pretrained`` (a relative local folder is read relative to the bundle
    folder). Before any weight is read, every recorded file's sha256 is checked, every weight file's tensor names
    and shapes (its safetensors header) are checked against its config, and the VLM's content fingerprint is
    compared with the recorded one (for a Hub id not downloaded yet: right after the adapter downloads it).

    A VLM that differs from the recorded one is an error when it comes from the bundle's own record (other weights
    now at the recorded path), and a warning when ``adapter_overrides`` names it: that is the caller's explicit
    choice, and a legitimate one (a converted or re-saved copy of the same model is other bytes).

    Args:
        directory: The bundle folder.
        adapter_overrides: Adapter arguments that replace the recorded ones (not ``trust_remote_code``).
        trust_remote_code: Passed to the adapter when it accepts it; never taken from the bundle.

    Raises:
        BundleError: Naming each file whose sha256 differs from the record, each missing, unexpected and mis-shaped
            tensor, an unreadable safetensors file, a missing part of the bundle, an unknown setting, or a VLM that
            differs from the recorded one (naming the recorded and the found ``pretrained``).
        FileNotFoundError: A missing ``vugen.json``, config or weight file.
    """
    directory = Path(directory)
    record = check_bundle_files(directory)
    shape, config = _latent_sampler_settings(record["latent_sampler"], f"{directory / CONFIG_FILE}: latent_sampler")
    try:
        sampling = SamplingConfig.from_dict(record["sampling"], f"{directory / CONFIG_FILE}: sampling")
    except ValueError as error:
        raise BundleError(str(error)) from error
    reducer, decoder, decoder_sampling = read_decoder_export(directory)
    adapter = _load_checked_vlm(directory, record, adapter_overrides or {}, trust_remote_code)
    latent_sampler = LatentSampler(adapter, **shape, config=config)
    _load_bridge(latent_sampler.bridge, directory / "bridge")
    _load_lora(adapter.language_model, directory / "lora")
    for module in (latent_sampler, reducer, decoder):
        module.requires_grad_(False).eval()
    return {
        "latent_sampler": latent_sampler,
        "reducer": reducer,
        "decoder": decoder,
        "sampling": sampling,
        "decoder_sampling": decoder_sampling,
    }


def check_bundle_files(directory: Path) -> dict[str, Any]:
    """The bundle's ``vugen.json`` record, after checking its files without loading anything: every part is there,
    every recorded file has its recorded sha256, every weight file's tensor names and shapes match its config.

    Raises:
        BundleError: A missing part, a changed file or a mis-shaped tensor, named.
        FileNotFoundError: A missing ``vugen.json``, config or weight file.
    """
    record = read_config(directory)
    missing = [name for name in _BUNDLE_ENTRIES if not (directory / name).exists()]
    if missing:
        raise BundleError(f"{directory} is an incomplete vugen bundle: missing {', '.join(missing)}")
    _check_sha256(directory, record.get("sha256", {}))
    for name, module_cls in _MODULE_FOLDERS.items():
        check_weights(directory / name / WEIGHTS_FILE, _expected_shapes(directory / name, module_cls))
    return record


def read_config(directory: Path) -> dict[str, Any]:
    """The bundle's ``vugen.json``, checked for its format and version; a version 1 or 2 record is translated to the
    current layout (``latent_sampler`` and ``sampling``)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a vugen bundle (VugenPipeline.save_pretrained)")
    record = _read_json(path)
    if record.get("format") != FORMAT or not isinstance(record.get("format_version"), int):
        raise BundleError(f"{path}: not a vugen bundle config (expected format {FORMAT!r} and a format_version)")
    if record["format_version"] > FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {record['format_version']} is newer than this vugen reads ({FORMAT_VERSION}); "
            "upgrade vugen"
        )
    if record["format_version"] < 3:
        record = _translated(record, path)
    absent = [key for key in ("adapter", "latent_sampler", "sampling") if key not in record]
    if absent:
        raise BundleError(f"{path}: missing {', '.join(absent)}")
    return record


def _translated(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """A version 1 or 2 record in the version 3 layout: its ``sampler`` object split into the latent sampler's
    arguments and the sampling settings."""
    old = record.get("sampler")
    if not isinstance(old, dict):
        raise BundleError(f"{path}: missing sampler (a version {record['format_version']} bundle)")
    sampling = {new: old[key] for key, new in _LEGACY_SAMPLING.items() if key in old}
    sampler_config = {key: value for key, value in old.items() if key not in _LEGACY_SAMPLING}
    reducer_config = _read_json(path.parent / "reducer" / "config.json")
    sampler_config = {"latent_dim": reducer_config.get("latent_dim"), **sampler_config}
    rest = {key: value for key, value in record.items() if key != "sampler"}
    return rest | {"latent_sampler": sampler_config, "sampling": sampling}


def _latent_sampler_settings(record: Any, source: str) -> tuple[dict[str, int], LatentSamplerConfig]:
    """``({latent_dim, image_size}, LatentSamplerConfig)`` of a bundle's ``latent_sampler`` record, every key
    checked (an unknown or missing one is named)."""
    if not isinstance(record, dict) or any(
        not isinstance(record.get(key), int) for key in ("latent_dim", "image_size")
    ):
        raise BundleError(f"{source}: expected an object with integer latent_dim and image_size, got {record!r}")
    shape = {key: record[key] for key in ("latent_dim", "image_size")}
    try:
        config = LatentSamplerConfig.from_dict({k: v for k, v in record.items() if k not in shape}, source)
    except ValueError as error:
        raise BundleError(str(error)) from error
    return shape, config


def check_weights(file: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Compare a safetensors file's tensor names and shapes (its header only) with the expected ones.

    Raises:
        FileNotFoundError: The file does not exist.
        BundleError: Naming every missing and unexpected tensor and every shape mismatch, or a file that is not a
            readable safetensors file (truncated, damaged).
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    try:
        with safe_open(file, "pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except SafetensorError as error:
        raise BundleError(
            f"{file} is not a readable safetensors file, truncated or damaged ({error}): copy or export it again"
        ) from error
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


def _with_vlm_fingerprint(record: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``record`` with its VLM's content fingerprint (``vlm``), and a relative local ``pretrained`` rewritten
    relative to the bundle ``directory`` (Hub ids and absolute paths as they are)."""
    init_args = record["adapter"]["init_args"]
    pretrained = init_args.get("pretrained")
    found = vlm_fingerprint(pretrained, init_args.get("revision"))
    if found is not None and found["kind"] == "local" and not Path(pretrained).expanduser().is_absolute():
        relative = os.path.relpath(Path(pretrained).resolve(), directory.resolve())
        record = record | {"adapter": record["adapter"] | {"init_args": init_args | {"pretrained": relative}}}
    return record | {"vlm": found}


def _recorded_adapter(record: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """The recorded adapter config, a bundle-relative local ``pretrained`` (format 2) resolved against
    ``directory``."""
    adapter, pretrained = record["adapter"], record["adapter"].get("init_args", {}).get("pretrained")
    local = (record.get("vlm") or {}).get("kind") == "local"
    if not local or not pretrained or Path(pretrained).expanduser().is_absolute():
        return dict(adapter)
    return adapter | {"init_args": adapter["init_args"] | {"pretrained": str((directory / pretrained).resolve())}}


def _load_checked_vlm(
    directory: Path, record: Mapping[str, Any], overrides: Mapping[str, Any], trust_remote_code: bool
) -> VLMAdapter:
    """The adapter, its VLM checked against the recorded fingerprint before it is loaded (when it is on disk) or
    right after (a Hub id that the adapter downloads first)."""
    adapter_record = _recorded_adapter(record, directory)
    if record.get("vlm") is None:  # a version-1 bundle, or a VLM source without a content fingerprint
        return _build_adapter(adapter_record, overrides, trust_remote_code, directory / CONFIG_FILE)
    init_args = {**adapter_record.get("init_args", {}), **overrides}
    source = (init_args.get("pretrained"), init_args.get("revision"))
    check = functools.partial(_check_vlm, directory, record, source[0], overridden="pretrained" in overrides)
    found = vlm_fingerprint(*source)
    if found is None and record["vlm"]["kind"] == "hub":  # not downloaded yet: check what the adapter downloads
        adapter = _build_adapter(adapter_record, overrides, trust_remote_code, directory / CONFIG_FILE)
        check(vlm_fingerprint(*source))
        return adapter
    check(found)  # before loading the VLM's weights
    return _build_adapter(adapter_record, overrides, trust_remote_code, directory / CONFIG_FILE)


def _check_vlm(
    directory: Path, record: Mapping[str, Any], pretrained: str, found: dict[str, Any] | None, *, overridden: bool
) -> None:
    """Refuse (warn, when ``adapter_overrides`` chose it) a VLM whose fingerprint differs from the recorded one."""
    expected = record["vlm"]
    if found is None:
        changes = ["nothing is there (no such file or folder, nor a Hub snapshot in the local cache)"]
    else:
        changes = fingerprint_differences(expected, found)
    if not changes:
        return
    message = (
        f"{directory / CONFIG_FILE} was made with the VLM {record['adapter']['init_args'].get('pretrained')!r} "
        f"({describe_fingerprint(expected)}), but the VLM at {pretrained!r} differs: {', '.join(changes)}"
    )
    if overridden:
        # stacklevel: the caller of VugenPipeline.from_pretrained
        warnings.warn(f"{message}; loading it anyway, as adapter_overrides names it", stacklevel=5)
        return
    raise BundleError(
        f"{message}. Pass adapter_overrides={{'pretrained': PATH}} to VugenPipeline.from_pretrained naming a copy "
        "of the VLM the bundle was made with, or put that VLM back where vugen.json says"
    )


def _check_sha256(directory: Path, recorded: Mapping[str, str]) -> None:
    """Every file that ``vugen.json`` records has its recorded sha256 (read whole, before anything else is read)."""
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing ({CONFIG_FILE} records its sha256)")
        found = sha256_of(path)
        if found != digest:
            raise BundleError(
                f"{path} was changed or damaged after the bundle was written (truncated, half-copied?): its sha256 "
                f"is {found[:12]}.., {CONFIG_FILE} records {digest[:12]}..; copy or export the bundle again"
            )


def _build_adapter(
    record: Mapping[str, Any], overrides: Mapping[str, Any], trust_remote_code: bool, source: str | Path = CONFIG_FILE
) -> VLMAdapter:
    """The bundle's VLM adapter: a registered adapter class only (checked before import), and the caller's
    ``trust_remote_code``, never the bundle's (``source``: the ``vugen.json`` read, for error messages)."""
    adapter_cls = adapter_class_from_record(record.get("class_path"), f"{source}: adapter.class_path")
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
    # A setting added since the bundle was written is absent from its config.json: it had the default value then.
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(LatentBridge).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    config = {**defaults, **_read_json(folder / "config.json")}
    if config != bridge.config:
        raise BundleError(
            f"{folder / 'config.json'} is {config}, but vugen.json and the VLM give the latent bridge {bridge.config}"
        )
    load_model(bridge, folder / WEIGHTS_FILE, strict=True)  # already checked: cannot fail on names or shapes


def _save_lora(folder: Path, sampler: LatentSampler, state: dict[str, Tensor]) -> None:
    """The LoRA folder: peft's weights file, its ``LoraConfig`` as ``scoped_lora_config.json`` (written by peft, then
    renamed so that ``PeftModel.from_pretrained`` finds no adapter here) and a README saying how to load it."""
    config = copy.deepcopy(sampler.lora_config)
    init_args = sampler.adapter.init_config()["init_args"]
    config.base_model_name_or_path, config.revision = init_args.get("pretrained"), init_args.get("revision")
    config.save_pretrained(folder)
    (folder / PEFT_CONFIG_NAME).rename(folder / LORA_CONFIG)
    save_file({PEFT_PREFIX + key: value for key, value in state.items()}, folder / LORA_WEIGHTS, {"format": "pt"})
    (folder / "README.md").write_text(lora_readme(sampler.config.lora_scope))


def _load_lora(language_model: nn.Module, folder: Path) -> None:
    expected = get_peft_model_state_dict(language_model, adapter_name=LORA_ADAPTER_NAME)
    check_weights(folder / LORA_WEIGHTS, {PEFT_PREFIX + key: tuple(value.shape) for key, value in expected.items()})
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(folder / LORA_WEIGHTS).items()}
    set_peft_model_state_dict(language_model, state, adapter_name=LORA_ADAPTER_NAME)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from error


def sha256_of(path: Path) -> str:
    """The sha256 of a file as hex, read in chunks (weight files can be large)."""
    with path.open("rb") as handle:
        return sha_fileobj(handle).hex()  # read in chunks: weight files can be large


def _gathered(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` whole (FSDP2 shards are gathered: a collective) and on the CPU."""
    from torch.distributed.tensor import DTensor

    state = {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in state.items()}
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}
