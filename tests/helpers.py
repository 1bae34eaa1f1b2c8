"""Shared test settings and helpers."""

from pathlib import Path

from safetensors.torch import load_file, save_file

# A Trainer that prints, logs and checkpoints nothing: tests assert on the module and on what they write.
QUIET_TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def replace_vlm_weights(folder: Path) -> None:
    """Other weights at the same path, of the same size and layout: one tensor in the middle of the saved VLM's
    ``model.safetensors`` shifted by 0.01 (its header, and so its size, unchanged)."""
    file = folder / "model.safetensors"
    state, size = load_file(file), file.stat().st_size
    name = sorted(state)[len(state) // 2]
    state[name] = state[name] + 0.01
    save_file(state, file, {"format": "pt"})
    assert file.stat().st_size == size
