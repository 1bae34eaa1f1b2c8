"""Shared test settings."""

# A Trainer that prints, logs and checkpoints nothing: tests assert on the module and on what they write.
QUIET_TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}
