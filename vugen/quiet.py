"""What a vugen run prints that is expected, hidden: warnings and info lines a new user would have to look up although
nothing is wrong. Every other warning shows as usual.

Used around every ``vugen`` command (:mod:`vugen.cli`) and by :class:`~vugen.lightning_cli.VugenCLI`. Only the
standard library: the filters match by message, category and module, so nothing is imported to name them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["expected_output_hidden"]

# (message regex, category, module that warns)
_EXPECTED_WARNINGS = (
    # The frozen VLM is in eval mode by design: AdapterStage.on_train_start says so in its own words, and names any
    # other module in eval mode. (Lightning's PossibleUserWarning is a UserWarning.)
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning, r"lightning\.pytorch\."),
    # Lightning's own pytree helper builds torch's deprecated LeafSpec for every fit's data: nothing vugen or a user
    # can change (Lightning's to fix).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)
# Lightning's info lines that advertise its cloud services ("💡 Tip: ... try installing litlogger"): not about the run.
_TIP = "💡 Tip:"


@contextlib.contextmanager
def expected_output_hidden() -> Iterator[None]:
    """Hide what a vugen run prints that is expected (:data:`_EXPECTED_WARNINGS`, Lightning's tips) while inside."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning's rank_zero_info writes

    def no_tip(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP)

    tips.addFilter(no_tip)
    try:
        with warnings.catch_warnings():
            for message, category, module in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
            yield
    finally:
        tips.removeFilter(no_tip)
