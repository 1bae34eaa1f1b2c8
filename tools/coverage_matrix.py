"""The coverage matrix: `vugen check` on a tiny checkpoint of every architecture transformers maps to
`AutoModelForImageTextToText`, written to docs/coverage.md and docs/coverage.json.

    make coverage                                   # all of them, 2 worker processes -> docs/coverage.{md,json}
    python -m tools.coverage_matrix --jobs 1 glm4v lfm2_vl   # some of them (writes nothing unless --out is given)
    python -m tools.coverage_matrix --out /tmp/m --compare docs/coverage.json   # CI: fail on a lost architecture

Per architecture: its tiny checkpoint (`vugen tiny ARCH DIR`: the hand-written recipe for the families that have
one, the generic shrink of `vugen_adapters.tiny.architecture` otherwise), `vugen check` through `auto`, and, where a
family adapter is registered under the model type, `vugen check` through that adapter too (so the matrix says
whether the family file earns its place). Each architecture runs in a worker process under a time limit, so one
that hangs or crashes costs only its own row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ARCH_SECONDS = 150  # per architecture: build + one or two checks; tiny checks take ~5-30 s
STAGE_CHECKS = ("decoder_stage", "cache_latents", "sampler_stage", "export")
LANGUAGE_CHECKS = ("tokenize", "embeddings", "gradients", "kv_cache", "padding", "positions")


def architectures() -> list[str]:
    """Every model type in transformers' image-text-to-text mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


class ArchitectureTimeout(BaseException):
    """An architecture ran out of time. A BaseException, so that `check_checkpoint`, which records any Exception of a
    check and goes on to the next, lets it through."""


def _timeout(*_: Any) -> None:
    raise ArchitectureTimeout(f"took longer than {ARCH_SECONDS} s")


def _quiet_worker() -> None:
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)  # one thread per worker: 2 workers on 2 cores
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGALRM, _timeout)


def run_architecture(arch: str) -> dict[str, Any]:
    """Build the tiny checkpoint of `arch` and check it through `auto` (and its family adapter, if registered)."""
    from vugen.commands.check import check_checkpoint, default_adapter
    from vugen_adapters.tiny import build_tiny_vlm

    row: dict[str, Any] = {"architecture": arch, "built": False, "build_reason": "", "checks": {}}
    if reason := recipe_does_not_apply(arch):  # said from the default config, built or not
        return row | {"not_applicable": reason, "seconds": 0.0}
    start = time.perf_counter()
    signal.alarm(ARCH_SECONDS)
    try:
        with tempfile.TemporaryDirectory(prefix=f"coverage-{arch}-") as tmp:
            try:
                folder = build_tiny_vlm(arch, Path(tmp) / "checkpoint")
            except Exception as error:  # the builder's one-line reason, or whatever broke
                row["build_reason"] = _one_line(error)
                return row
            row["built"] = True
            for adapter in dict.fromkeys(["auto", _family_adapter(folder, default_adapter)]):
                if adapter is not None:
                    report = check_checkpoint(str(folder), adapter=adapter, workdir=Path(tmp) / f"check-{adapter}")
                    row["checks"][adapter] = report.to_dict()
    except ArchitectureTimeout as error:
        row["timeout"] = str(error)
    finally:
        signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def recipe_does_not_apply(arch: str) -> str:
    """Why vugen's recipe does not apply to `arch` (`vugen.applicability`, on its config class's defaults), or ""."""
    from transformers import AutoConfig

    from vugen.applicability import NotApplicableError, check_recipe_applies

    try:
        check_recipe_applies(AutoConfig.for_model(arch).to_dict(), f"{arch}'s default config")
    except NotApplicableError as error:
        return str(error)
    except Exception:  # a config that cannot be built with its defaults: the build says why
        return ""
    return ""


def _family_adapter(folder: Path, default_adapter: Any) -> str | None:
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    name = default_adapter(model_type)
    return None if name == "auto" else name


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ------------------------------------------------------------------------------------------------------------ verdicts
def verdict(record: dict[str, Any] | None) -> str:
    """`pass`, `fail` or `not_applicable` of one check record (None: not run)."""
    return "not run" if record is None else record["status"]


def first_failure(record: dict[str, Any]) -> str:
    """The first failed check and its reason, in one line."""
    for check in record["checks"]:
        if check["status"] in ("fail", "not_applicable"):
            return f"{check['name']}: {check['reason']}"
    return ""


def group_status(record: dict[str, Any] | None, names: tuple[str, ...]) -> str:
    """`ok`, `FAIL` (some failed) or `-` (skipped / not run) over a group of checks."""
    if record is None or record["status"] == "not_applicable":
        return "-"
    statuses = {c["status"] for c in record["checks"] if c["name"] in names}
    return "FAIL" if "fail" in statuses else "-" if statuses <= {"skip"} or not statuses else "ok"


def adapter_status(record: dict[str, Any] | None) -> str:
    """The adapter conformance checks: `ok`, or the names of those that failed."""
    if record is None or record["status"] == "not_applicable":
        return "-"
    skip = {"load", "understanding", "generate", *STAGE_CHECKS, *LANGUAGE_CHECKS}
    failed = [c["name"] for c in record["checks"] if c["name"] not in skip and c["status"] == "fail"]
    if record["checks"][0]["status"] != "pass":
        return "load failed"
    return ", ".join(failed) if failed else "ok"


def classify(row: dict[str, Any]) -> tuple[str, str]:
    """(`pass` / `fail` / `not_applicable` / `not_built`, reason) of one architecture, judged through `auto`."""
    if "not_applicable" in row:
        return "not_applicable", row["not_applicable"]
    if not row["built"]:
        return "not_built", row["build_reason"]
    if "timeout" in row:
        return "fail", row["timeout"]
    record = row["checks"].get("auto")
    status = verdict(record)
    return status, "" if status == "pass" else first_failure(record)


# ------------------------------------------------------------------------------------------------------------ writing
def write_matrix(rows: list[dict[str, Any]], out: Path, seconds: float, command: str) -> str:
    """Write `out`.md and `out`.json; return the summary line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    verdicts = {row["architecture"]: classify(row) for row in rows}
    counts = Counter(status for status, _ in verdicts.values())
    applicable = len(rows) - counts["not_applicable"]
    share = 100 * counts["pass"] / applicable if applicable else 0.0
    summary = (
        f"{len(rows)} architectures: {counts['pass']} of the {applicable} with a decoder-only language model pass "
        f"every check and the stage smoke through `auto` ({share:.0f} %); {counts['fail']} fail, {counts['not_built']} "
        f"do not build offline, {counts['not_applicable']} not applicable."
    )
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.write_text(json.dumps({"summary": summary, "seconds": round(seconds), "rows": rows}, indent=1) + "\n")
    md_path.write_text(_markdown(rows, verdicts, summary, seconds, command))
    return summary


def _markdown(
    rows: list[dict[str, Any]], verdicts: dict[str, tuple[str, str]], summary: str, seconds: float, command: str
) -> str:
    import transformers

    lines = [
        "# Coverage: every image-text-to-text architecture of transformers",
        "",
        f"Generated by `{command}` ({seconds / 60:.0f} min on this machine's 2 CPU cores) with transformers "
        f"{transformers.__version__}; do not edit by hand. The JSON beside this file has every check's result.",
        "",
        f"**{summary}**",
        "",
        "Each architecture: its tiny random checkpoint (`vugen tiny ARCH DIR`, saved with its own processor and chat "
        "template), then `vugen check DIR --adapter auto` (the adapter conformance checks, the language model, "
        "understanding bit-identical with the sampler's scoped LoRA, and a two-step smoke of the decoder stage, the "
        "latent cache, the sampler stage, export and generation). Where vugen registers a family adapter under the "
        "model type, the same check runs through it (last columns): a family file earns its place where `auto` "
        "fails or is slower.",
        "",
        "| architecture | builds offline | adapter checks | language model | understanding | stages | generate | "
        "auto | family adapter | reason (first failure) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        status, reason = verdicts[row["architecture"]]
        auto = row["checks"].get("auto")
        family = next(((name, rec) for name, rec in row["checks"].items() if name != "auto"), None)
        family_cell = f"{family[0]}: {verdict(family[1])}" if family else ""
        cells = [
            f"`{row['architecture']}`",
            "yes" if row["built"] else "no",
            adapter_status(auto),
            group_status(auto, LANGUAGE_CHECKS),
            group_status(auto, ("understanding",)),
            group_status(auto, STAGE_CHECKS),
            group_status(auto, ("generate",)),
            {"pass": "**pass**", "not_built": "-"}.get(status, status),
            family_cell,
            reason.replace("|", "\\|")[:220],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    by_reason = Counter(status for status, _ in verdicts.values())
    lines += ["", "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="*", help="model types (default: the whole mapping)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default docs/coverage for a full run)")
    parser.add_argument(
        "--compare", type=Path, help="a matrix JSON (docs/coverage.json): exit 1 if an architecture it passes fails now"
    )
    args = parser.parse_args(argv)
    names = args.architectures or architectures()
    out = args.out or (Path("docs/coverage") if not args.architectures else None)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # no torch state forked into the workers
    # No max_tasks_per_child: with it, Python 3.11 deadlocks when it replaces a worker (cpython #115634).
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_quiet_worker) as pool:
        rows = []
        for future in as_completed([pool.submit(run_architecture, name) for name in names]):
            row = future.result()
            status, reason = classify(row)
            print(f"{row['architecture']:<24} {status:<15} {row['seconds']:>6.1f}s  {reason[:150]}", flush=True)
            rows.append(row)
    rows.sort(key=lambda row: row["architecture"])
    seconds = time.perf_counter() - start
    command = "make coverage" if not args.architectures else "python -m tools.coverage_matrix " + " ".join(names)
    if out is not None:
        print(write_matrix(rows, out, seconds, command))
    return regressions(rows, args.compare) if args.compare else 0


def regressions(rows: list[dict[str, Any]], baseline: Path) -> int:
    """1 (and a line each) when an architecture that passes in `baseline` does not pass in `rows`, else 0."""
    before = {row["architecture"]: classify(row)[0] for row in json.loads(baseline.read_text())["rows"]}
    now = {row["architecture"]: classify(row) for row in rows}
    lost = [arch for arch, status in before.items() if status == "pass" and now.get(arch, ("not run",))[0] != "pass"]
    for arch in lost:
        print(f"regression: {arch} passed in {baseline}, now {now.get(arch, ('not run', ''))}", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
