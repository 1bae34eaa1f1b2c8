"""TEMPORARY stub until the prediction module lands."""

from __future__ import annotations

from typing import Any

import torch


def predict_images(pipeline: Any, batch: dict[str, Any]) -> dict[str, Any]:
    images = [
        pipeline.sample([p] * len(s), list(s)).cpu() for p, s in zip(batch["prompts"], batch["seeds"], strict=True)
    ]
    return {"images": torch.stack(images)}
