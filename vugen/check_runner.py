"""Running checks: a :class:`Check` (a named function, the hook to fix when it fails, the checks it needs), its
:class:`CheckResult`, and :func:`run_checks`, which runs checks in order, skipping those whose needs did not pass.

The adapter contract's checks themselves are in :mod:`vugen.conformance` (:data:`~vugen.conformance.ADAPTER_CHECKS`);
``vugen check`` adds the recipe's (:mod:`vugen.commands._recipe_checks`). A check raises :class:`AssertionError`
(:func:`expect`) with a one-line reason when it fails, or :class:`CheckSkipped` when it does not apply.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vugen.adapter import VLMAdapter

__all__ = ["Check", "CheckResult", "CheckSkipped", "Status", "expect", "failure_reason", "run_checks"]

Status = Literal["pass", "fail", "skip", "not_applicable"]


class CheckSkipped(Exception):
    """Raised by a check that does not apply to this adapter; the result is a skip with the reason, not a failure."""


def expect(condition: Any, reason: str) -> None:
    """Raise :class:`AssertionError` with ``reason`` unless ``condition`` holds (unlike ``assert``, never stripped)."""
    if not condition:
        raise AssertionError(reason)


@dataclass(frozen=True)
class Check:
    """One named check, the adapter hook to override when it fails, and the checks it needs to have passed.

    Attributes:
        name: Short name (a table row, a JSON record).
        run: ``run(adapter, image_size)``; raises with the reason when the check fails.
        hook: What to override in the adapter (or fix in the checkpoint) when it fails.
        needs: Names of checks that must pass first; when one did not, this one is skipped.
    """

    name: str
    run: Callable[[VLMAdapter, int], None]
    hook: str
    needs: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        """The first line of the check function's docstring."""
        return (self.run.__doc__ or self.name).strip().splitlines()[0]


@dataclass
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: The check's name.
        status: ``pass``, ``fail``, ``skip`` (a check it needs did not pass) or ``not_applicable``.
        seconds: Wall time it took.
        reason: Why it failed or was skipped, in one line; empty when it passed.
        hook: What to override when it failed.
        detail: The traceback of a failure (not printed in the table).
    """

    name: str
    status: Status
    seconds: float = 0.0
    reason: str = ""
    hook: str = ""
    detail: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: name, status, seconds, reason, hook."""
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
            "hook": self.hook,
        }


def run_checks(
    checks: Iterable[Check],
    adapter: VLMAdapter,
    image_size: int,
    earlier: Iterable[CheckResult] = (),
    report: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run ``checks`` in order; a failure does not stop the next check, but skips those that need it.

    Args:
        checks: The checks.
        adapter: The adapter under test.
        image_size: Image side the checks encode.
        earlier: Results of checks run before (what ``needs`` may name).
        report: Called with each result as it comes.

    Returns:
        One result per check.
    """
    passed = {result.name for result in earlier if result.status == "pass"}
    seen = {result.name for result in earlier}
    results = []
    for check in checks:
        missing = [name for name in check.needs if name in seen and name not in passed]
        result = _skipped(check, missing) if missing else _run_one(check, adapter, image_size)
        results.append(result)
        seen.add(check.name)
        if result.status == "pass":
            passed.add(check.name)
        if report is not None:
            report(result)
    return results


def _skipped(check: Check, missing: list[str]) -> CheckResult:
    return CheckResult(check.name, "skip", reason=f"needs {', '.join(missing)}, which did not pass")


def _run_one(check: Check, adapter: VLMAdapter, image_size: int) -> CheckResult:
    start = time.perf_counter()
    try:
        check.run(adapter, image_size)
    except CheckSkipped as reason:
        return CheckResult(check.name, "skip", time.perf_counter() - start, reason=str(reason))
    except Exception as error:  # a check reports whatever stops it: that is its job
        return CheckResult(
            check.name,
            "fail",
            time.perf_counter() - start,
            reason=failure_reason(error),
            hook=check.hook,
            detail=traceback.format_exc(),
        )
    return CheckResult(check.name, "pass", time.perf_counter() - start)


def failure_reason(error: BaseException) -> str:
    """One line saying why ``error`` ended a check: its message (the first line), prefixed by its type unless it is an
    :class:`AssertionError` (a check's own reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if isinstance(error, AssertionError) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
