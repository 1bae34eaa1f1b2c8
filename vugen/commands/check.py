"""`vugen check PRETRAINED`: does vugen work on this VLM? What a user runs first on their own checkpoint.

It loads the checkpoint with an adapter, runs the adapter conformance checks (:data:`vugen.conformance.ADAPTER_CHECKS`),
the understanding check with the latent sampler's scoped LoRA, and a few-step smoke of every stage at a small image
size (:class:`~vugen.commands._recipe_checks.RecipeSmoke`), and prints one row per check: result, time, and for a
failure the reason and the adapter hook to override. :func:`check_checkpoint` returns the same record for scripts
(a coverage run over many architectures): ``CheckReport.to_dict()`` is what ``--json`` writes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from transformers.utils import logging as transformers_logging

from vugen import __version__
from vugen.adapter import DType, FeatureSource, VLMAdapter
from vugen.applicability import NotApplicableError, check_recipe_applies
from vugen.check_runner import CheckResult, failure_reason, run_checks
from vugen.commands._recipe_checks import UNDERSTANDING, RecipeSmoke
from vugen.conformance import ADAPTER_CHECKS
from vugen.errors import TRACEBACK_ENV, VugenError
from vugen.hub import local_folder_or_hub_id
from vugen.registry import get_adapter_class, list_adapters, registered_while

__all__ = ["CheckReport", "ChecksFailed", "check", "check_checkpoint", "smallest_image_size"]

LOAD = "load"
SIDES = range(32, 1025, 8)  # image sides tried for the checks: Shapes needs multiples of 8
# Tokens per image the smoke needs: its first batch (2 images) initialises the reducer by PCA, which needs more tokens
# than the 8 latent channels.
MIN_TOKENS = 8


class ChecksFailed(VugenError):
    """Some checks of ``vugen check`` failed (the table says which and why)."""


@dataclass
class CheckReport:
    """What ``vugen check`` found on one checkpoint.

    Attributes:
        checkpoint: The ``pretrained`` checked.
        model_type: Its ``config.json`` ``model_type`` (None if unread).
        adapter: The adapter's registered name or class path.
        adapter_class: The adapter's class path (None if unknown).
        image_size: The image side the checks used (None before the adapter loaded).
        results: One result per check, ``load`` first.
        seconds: Wall time of the whole check.
        error: What stopped loading, if anything (not in :meth:`to_dict`).
    """

    checkpoint: str
    model_type: str | None = None
    adapter: str | None = None
    adapter_class: str | None = None
    image_size: int | None = None
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    error: BaseException | None = field(default=None, repr=False)

    @property
    def status(self) -> Literal["pass", "fail", "not_applicable"]:
        """``not_applicable`` (the recipe does not apply to this model), ``fail`` (a check failed) or ``pass``."""
        if any(result.status == "not_applicable" for result in self.results[:1]):
            return "not_applicable"
        return "fail" if any(result.status == "fail" for result in self.results) else "pass"

    @property
    def failures(self) -> list[CheckResult]:
        """The failed checks."""
        return [result for result in self.results if result.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: checkpoint, model_type, adapter, status, seconds, and per check name, status, seconds,
        reason and hook."""
        return {
            "checkpoint": self.checkpoint,
            "model_type": self.model_type,
            "adapter": self.adapter,
            "adapter_class": self.adapter_class,
            "image_size": self.image_size,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "vugen_version": __version__,
            "checks": [result.to_dict() for result in self.results],
        }

    def header(self) -> str:
        """The line above the table: checkpoint, model type, adapter, image size."""
        return (
            f"vugen check {self.checkpoint}: model_type {self.model_type or '-'}, adapter {self.adapter} "
            f"({self.adapter_class}), images {self.image_size} px"
        )

    def summary(self) -> str:
        """The line below the table: counts per result and the total time."""
        counts = {status: sum(r.status == status for r in self.results) for status in ("pass", "fail", "skip")}
        return (
            f"{len(self.results)} checks: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
            f"in {self.seconds:.1f} s"
        )

    def table(self) -> str:
        """The whole table as text: header, column titles, one row per check, summary."""
        return "\n".join([self.header(), TITLES, *(table_row(result) for result in self.results), self.summary()])


TITLES = f"{'check':<15} {'result':<6} {'time':>7}  reason (hook to override)"


def table_row(result: CheckResult) -> str:
    """One row: name, result, seconds, and for a failure or skip the reason (and the hook)."""
    label = {"pass": "pass", "fail": "FAIL", "skip": "skip", "not_applicable": "n/a"}[result.status]
    reason = f"{result.reason} (override: {result.hook})" if result.hook else result.reason
    return f"{result.name:<15} {label:<6} {result.seconds:>6.2f}s  {reason}".rstrip()


def check_checkpoint(
    pretrained: str,
    adapter: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    image_size: int | None = None,
    feature_source: FeatureSource | None = None,
    dtype: DType | None = None,
    stages: bool = True,
    steps: int = 2,
    accelerator: str = "auto",
    workdir: str | Path | None = None,
    progress: Callable[[CheckReport, CheckResult], None] | None = None,
) -> CheckReport:
    """Run every check of ``vugen check`` on a checkpoint and return the report; never raises for what it finds.

    Args:
        pretrained: A local folder or a Hub id of a VLM checkpoint.
        adapter: A registered adapter name or a class path (registered while the check runs, so the smoke's export
            and generate may rebuild it from their files); None: the registered adapter named like the checkpoint's
            ``model_type``, else ``auto``.
        revision: Hub revision of the checkpoint.
        trust_remote_code: Let the checkpoint run its own modelling code (pin ``revision``).
        image_size: Image side for the checks, also given to the adapter (the side it resizes images to); None: the
            smallest side from 32 px (a multiple of 8) the adapter accepts (:func:`smallest_image_size`).
        feature_source: Passed to the adapter (``vision`` or ``projector``); None: the adapter's default.
        dtype: Passed to the adapter (``float32``, ``bfloat16``, ...); None: the adapter's default.
        stages: Run the stage smoke (decoder stage, latent cache, sampler stage, export, generate).
        steps: Optimizer steps per stage in the smoke.
        accelerator: Lightning accelerator of the smoke (``auto``: a GPU when there is one).
        workdir: Folder the smoke writes into (kept); None: a temporary one, removed after.
        progress: Called with the report and each result as it comes (``load`` first).

    Returns:
        The report; ``report.error`` holds what stopped loading, if anything.
    """
    start = time.perf_counter()
    report = CheckReport(str(pretrained))
    options = {"revision": revision, "trust_remote_code": trust_remote_code or None}
    options |= {"image_size": image_size, "feature_source": feature_source, "dtype": dtype}

    def note(result: CheckResult) -> None:
        report.results.append(result)
        report.seconds = time.perf_counter() - start
        if progress is not None:
            progress(report, result)

    loaded, load_result = _load(report, adapter, options)
    note(load_result)
    # A class path on the user's command line is the user's choice: the smoke's export and generate may rebuild it
    # from the checkpoint and bundle they write (files name only registered adapters).
    registration = registered_while(type(loaded)) if loaded is not None else contextlib.nullcontext()
    with _workdir(workdir) as folder, registration:
        smoke = RecipeSmoke(folder, steps=steps, accelerator=accelerator, trust_remote_code=trust_remote_code)
        adapter_checks, stage_checks = (*ADAPTER_CHECKS, UNDERSTANDING), smoke.checks()
        if loaded is None:
            status = "not_applicable" if report.status == "not_applicable" else "skip"
            for check in (*adapter_checks, *stage_checks):
                note(CheckResult(check.name, status, reason=f"needs {LOAD}, which did not pass"))
            return report
        chosen = (*adapter_checks, *(stage_checks if stages else ()))
        run_checks(chosen, loaded, report.image_size, earlier=report.results, report=note)
    if not stages:
        for check in stage_checks:
            note(CheckResult(check.name, "skip", reason="stage smoke off (--stages false)"))
    return report


def _load(report: CheckReport, adapter: str | None, options: dict[str, Any]) -> tuple[VLMAdapter | None, CheckResult]:
    """Read the config, choose and build the adapter, find the image size (filling in ``report``)."""
    start = time.perf_counter()
    try:
        config, source = read_config(report.checkpoint, options["revision"])
        report.model_type = config.get("model_type")
        check_recipe_applies(config, source)
        report.adapter = adapter or default_adapter(report.model_type)
        cls = get_adapter_class(report.adapter)
        report.adapter_class = f"{cls.__module__}.{cls.__qualname__}"
        loaded = cls(pretrained=report.checkpoint, **_adapter_options(cls, options))
        report.image_size = options["image_size"] or smallest_image_size(loaded)
    except Exception as error:  # whatever stops loading is this check's finding
        report.error = error
        status = "not_applicable" if isinstance(error, NotApplicableError) else "fail"
        return None, CheckResult(LOAD, status, time.perf_counter() - start, failure_reason(error), "__init__")
    return loaded, CheckResult(LOAD, "pass", time.perf_counter() - start)


def read_config(pretrained: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """A checkpoint's ``config.json`` (a local folder's, or downloaded from the Hub) and where it was read.

    Raises:
        FileNotFoundError: A local folder without ``config.json``.
        VugenError: The file is no JSON object, or the Hub could not give it.
    """
    path = local_folder_or_hub_id(pretrained, "PRETRAINED")
    if path is None:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(pretrained, "config.json", revision=revision))
        except Exception as error:  # offline, unknown repo, gated, ...: one line, naming the repo
            reason = failure_reason(error)
            raise VugenError(f"{pretrained}: could not read config.json from the Hub ({reason})") from error
    else:
        file = path / "config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{pretrained} holds no VLM: {file.name} is missing (expected a folder written by `save_pretrained`, "
                "with config.json, the weights and the processor)"
            )
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VugenError(f"{file}: not a JSON config ({error})") from error
    if not isinstance(config, dict):
        raise VugenError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config, str(file)


def default_adapter(model_type: str | None) -> str:
    """The registered adapter named like ``model_type``, else ``auto``."""
    return model_type if model_type in list_adapters() else "auto"


def _adapter_options(cls: type[VLMAdapter], options: dict[str, Any]) -> dict[str, Any]:
    """The options the user set, checked against the adapter's constructor."""
    given = {key: value for key, value in options.items() if value is not None}
    accepted = inspect.signature(cls).parameters
    refused = [key for key in given if key not in accepted]
    if refused:
        raise ValueError(f"adapter {cls.__qualname__} takes no {', '.join(refused)}: drop --{' --'.join(refused)}")
    return given


def smallest_image_size(adapter: VLMAdapter) -> int:
    """The smallest side in :data:`SIDES` for which the adapter gives a token grid of at least 2 x 2 and
    :data:`MIN_TOKENS` tokens; the first side when none does (the checks that encode images then fail, saying why)."""
    for side in SIDES:
        try:
            rows, cols = adapter.token_grid(side, side)
        except Exception:  # e.g. a dynamic-resolution encoder whose sides must be multiples of 28 px
            continue
        if rows >= 2 and cols >= 2 and rows * cols >= MIN_TOKENS:
            return side
    return SIDES[0]


@contextlib.contextmanager
def _workdir(workdir: str | Path | None) -> Iterator[Path]:
    """The smoke's folder: the one given (kept), or a temporary one removed on exit."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="vugen-check-") as folder:
        yield Path(folder)


def check(
    pretrained: str,
    adapter: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    image_size: int | None = None,
    feature_source: FeatureSource | None = None,
    dtype: DType | None = None,
    stages: bool = True,
    steps: int = 2,
    accelerator: str = "auto",
    workdir: str | None = None,
    json: str | None = None,
) -> None:
    """`vugen check PRETRAINED [--adapter NAME]`: does vugen work on this VLM? Run it first on your own checkpoint.

    Loads the checkpoint with an adapter and runs the adapter conformance checks (features in raster order, prompt
    tokenisation with the chat template, the LM with a KV cache equal to the full pass, LoRA targets inside the LM
    only, ...), the VLM's understanding with the latent sampler's scoped LoRA in place (bit-identical), and a
    few-step smoke of every stage at a small image size (decoder stage, latent cache, sampler stage, export, one
    generated image). Prints one row per check: result, time, and for a failure the reason and the adapter hook to
    override. Exits 0 only when every check passes. A checkpoint vugen cannot use (no config.json, remote code
    without --trust_remote_code, an encoder-decoder model) ends in one line.

    Args:
        pretrained: A local folder or a Hub id of the VLM checkpoint.
        adapter: A registered adapter (``vugen adapters``) or a class path (registered while the check runs);
            default: the registered adapter named like the checkpoint's ``model_type``, else ``auto``.
        revision: Hub revision (branch, tag or commit) of the checkpoint.
        trust_remote_code: Let the checkpoint run its own modelling code (pin --revision to a commit you have read).
        image_size: Image side for the checks, also given to the adapter; default: the smallest side from 32 px the
            adapter accepts.
        feature_source: ``vision`` or ``projector``, given to the adapter; default: the adapter's.
        dtype: Weight dtype of the VLM (``float32``, ``bfloat16``, ``float16``, ``auto``), given to the adapter;
            default: the adapter's.
        stages: Run the few-step smoke of every stage (false: the adapter checks only).
        steps: Optimizer steps per stage in the smoke.
        accelerator: Lightning accelerator of the smoke: ``auto`` (a GPU when there is one), ``cpu``, ``gpu``.
        workdir: Keep what the smoke writes (exports, latent cache, checkpoint, bundle, image) in this folder;
            default: a temporary folder, removed after.
        json: Also write the report as one JSON record to this file (checkpoint, model_type, adapter, status,
            and per check name, status, seconds, reason, hook), also when loading fails.
    """
    show_everything = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    table = functools.partial(_print_row, out=sys.stdout)
    with contextlib.nullcontext() if show_everything else _library_output_hidden():
        report = check_checkpoint(
            pretrained,
            adapter,
            revision=revision,
            trust_remote_code=trust_remote_code,
            image_size=image_size,
            feature_source=feature_source,
            stages=stages,
            steps=steps,
            accelerator=accelerator,
            workdir=workdir,
            progress=table,
        )
    if json is not None:
        _write_record(Path(json), report)
    if report.error is not None:
        raise report.error  # one line for a known error (vugen.cli.main), a traceback for a bug
    print(report.summary(), flush=True)
    if show_everything:
        for failure in report.failures:
            print(f"--- {failure.name}\n{failure.detail}", file=sys.stderr)
    if report.failures:
        names = ", ".join(f"{r.name} (override: {r.hook})" for r in report.failures)
        raise ChecksFailed(f"{len(report.failures)} of {len(report.results)} checks failed: {names}")


def _print_row(report: CheckReport, result: CheckResult, out: TextIO) -> None:
    if report.results[0].status != "pass":
        return  # loading failed: the command ends in one line naming why
    if result.name == LOAD:
        print(f"{report.header()}\n{TITLES}", file=out, flush=True)
    print(table_row(result), file=out, flush=True)


@contextlib.contextmanager
def _library_output_hidden() -> Iterator[None]:
    """What the libraries print while the checks run (progress bars, deprecation warnings, "Loading weights"),
    hidden so the table reads well; ``--traceback`` shows it."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def _write_record(path: Path, report: CheckReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
