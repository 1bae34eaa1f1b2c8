"""Image features of a VLM that has no `get_image_features`: its vision tower and the projector beside it.

GIT encodes images inside its `forward` only. `AutoAdapter` finds the tower (the module configured by the vision
sub-config) and the projector (the one module beside it that maps the tower's width to the language model's) and
wraps them as `TowerFeatures`, which answers `get_image_features` as transformers' VLMs do.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling


def maps_width(module: nn.Module, width: int | None, text_width: int) -> bool:
    """Whether `module`'s first linear layer reads `width` channels and its last one writes `text_width`."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and linears[0].in_features == width and linears[-1].out_features == text_width


class TowerFeatures(nn.Module):
    """`get_image_features` for a VLM that only has a vision tower and a projector called inside its `forward` (GIT):
    the tower's `last_hidden_state` and `hidden_states`, and the projector's output as `pooler_output` (None where no
    projector was identified), as transformers' `get_image_features` return them."""

    def __init__(self, config: Any, tower: nn.Module, projector: nn.Module | None) -> None:
        super().__init__()
        self.config, self.tower, self.projector = config, tower, projector

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        """The vision tower, as transformers' `get_encoder(modality="image")` names it."""
        return self.tower

    def get_image_features(self, pixel_values: Tensor) -> BaseModelOutputWithPooling:
        """Encode `pixel_values` with the tower (and the projector)."""
        output = self.tower(**{self.tower.main_input_name: pixel_values})
        projected = None if self.projector is None else self.projector(output.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=output.last_hidden_state,
            hidden_states=getattr(output, "hidden_states", None),
            pooler_output=projected,
        )
