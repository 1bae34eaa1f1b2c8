"""Which checkpoints an adapter may load, decided before any weight is read: a local folder must exist and hold a
`config.json`; a checkpoint that ships its own modelling code (`auto_map`) needs the user's own `trust_remote_code`;
one outside vugen's recipe (encoder-decoder, cross-attention) is refused as not applicable."""

from __future__ import annotations

import json

from vugen.applicability import check_recipe_applies
from vugen.errors import VugenError
from vugen.hub import local_folder_or_hub_id

__all__ = ["RemoteCodeRefused", "check_pretrained_source", "remote_code_message"]


class RemoteCodeRefused(VugenError, ValueError):
    """A checkpoint needs code from its repository while `trust_remote_code` is off."""


def remote_code_message(pretrained: str) -> str:
    return (
        f"{pretrained!r} ships its own modelling code (config.json has 'auto_map'), and vugen does not run "
        "code from a checkpoint unless asked (never because a vugen checkpoint or bundle says so). To opt in, set "
        "`trust_remote_code: true` on the adapter (--model.adapter.init_args.trust_remote_code true; "
        "`vugen export ... --trust_remote_code true`; trust_remote_code=True to load_from_checkpoint or "
        "VugenPipeline.from_pretrained) and pin `revision` to a commit you have read, so the code cannot change "
        "under you."
    )


def check_pretrained_source(pretrained: str, trust_remote_code: bool) -> None:
    """Fail at once, naming the path, when a local folder is missing (a value that looks like a path is never
    taken for a Hub id, see :func:`vugen.hub.local_folder_or_hub_id`), holds no VLM or needs remote code."""
    path = local_folder_or_hub_id(pretrained, "adapter `pretrained`")
    if path is None:
        return  # a hub id: transformers resolves it
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"adapter `pretrained`: {pretrained!r} holds no VLM: config.json is missing "
            "(expected a folder written by `save_pretrained`, with config.json, the weights and the processor)"
        )
    config = json.loads(config_file.read_text())
    check_recipe_applies(config, str(config_file))
    if "auto_map" in config and not trust_remote_code:
        raise RemoteCodeRefused(remote_code_message(pretrained))
