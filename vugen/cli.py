"""The `vugen` command: LightningCLI's fit / validate / test / predict, plus vugen's own commands.

vugen fit --config configs/demo/decoder.yaml
vugen adapters | tiny | cache-latents | generate | export | export-geneval | export-dpg
"""

from __future__ import annotations

import sys
import warnings

from jsonargparse import CLI
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI

from vugen.commands import export, generate
from vugen.data.latent_writer import cache_latents
from vugen.eval.export import export_dpg, export_geneval
from vugen.registry import adapter_sources, get_adapter_class, list_adapters
from vugen_adapters.tiny import build_tiny_vlm

DESCRIPTION = (
    "vugen: train the three VUGEN stages of any Hugging Face VLM. Lightning subcommands below; "
    "vugen's own: `vugen adapters` (list the registered VLM adapters), `vugen tiny FAMILY DIR` (write a tiny "
    "offline VLM checkpoint), `vugen cache-latents` (encode a dataset into reduced latents once), `vugen generate` "
    "(text -> PNGs from a bundle), `vugen export` (sampler checkpoint -> bundle), `vugen export-geneval` / "
    "`vugen export-dpg` (benchmark layouts). `vugen COMMAND --help` for each."
)


class VugenCLI(LightningCLI):
    """LightningCLI in subclass mode: `model` is any stage, `data` any datamodule, chosen by `class_path`."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs) -> None:
        import_registered_adapters()  # so YAML can name adapters by class name, not only by class path
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            args=args,
            run=run,
            **kwargs,
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The trainer, with a Rich progress bar unless the run turns bars off or configures its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        return super().instantiate_trainer(**kwargs)


def import_registered_adapters() -> None:
    """Import every registered adapter class; one that fails to import is reported, not fatal."""
    for name in list_adapters():
        try:
            get_adapter_class(name)
        except Exception as error:  # a broken third-party plug-in must not take the CLI down
            warnings.warn(f"adapter {name!r} could not be imported: {error}", stacklevel=2)


def print_adapters() -> None:
    """`vugen adapters`: one line per registered adapter name and its class."""
    for name, source in sorted(adapter_sources().items()):
        print(f"{name:<12} {source}")


def tiny(family: str, directory: str, seed: int = 0) -> None:
    """`vugen tiny FAMILY DIR`: write a tiny random offline checkpoint of a VLM family (tests, demo).

    Args:
        family: a family of `vugen_adapters.tiny.TINY_FAMILIES` (llava, qwen2_vl, ...).
        directory: output folder; load it with the family's adapter as `pretrained`.
        seed: seed of the random weights.
    """
    print(build_tiny_vlm(family, directory, seed=seed))


# vugen's own commands, each a typed function whose signature and docstring are its --help (litgpt style).
COMMANDS = {
    "adapters": print_adapters,
    "tiny": tiny,
    "cache-latents": cache_latents,
    "generate": generate,
    "export": export,
    "export-geneval": export_geneval,
    "export-dpg": export_dpg,
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the `vugen` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        result = CLI(COMMANDS[argv[0]], args=argv[1:], prog=f"vugen {argv[0]}")
        if result is not None:
            print(result)
        return
    VugenCLI(args=args)


if __name__ == "__main__":
    main()
