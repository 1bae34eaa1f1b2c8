"""Run the benchmarks and print their table: ``python -m benchmarks.run [--device cpu|cuda] [--quick] ...``.

Every ratio compares two sides measured in this run, on this machine, with the same threads, so the ratios mean
something even on a loaded machine where the absolute times drift. ``--help`` lists each benchmark's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import decoder, sampler
from benchmarks.common import PRECISIONS, Benchmark, Settings, environment, print_report

# One entry per benchmark module: its BENCHMARK (name, config class, presets, rows; see common.Benchmark).
BENCHMARKS: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (decoder.BENCHMARK, sampler.BENCHMARK)}


def build_parser() -> argparse.ArgumentParser:
    """The command line: shared settings, then each benchmark's own flags."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (seconds, for tests)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS), metavar="NAME")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the environment and rows as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for both sides (default: torch's)")
    for benchmark in BENCHMARKS.values():
        benchmark.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the selected benchmarks, print the table and write the JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = Settings(torch.device(args.device), args.precision, args.quick)
    try:
        configs = {name: BENCHMARKS[name].configure(settings, args) for name in args.only}
    except ValueError as error:
        parser.error(str(error))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: ..." banner per fit
    rows = [row for name, config in configs.items() for row in BENCHMARKS[name].rows(settings, config)]
    env = environment(settings)
    print_report(rows, env)
    if args.json is not None:
        report = {"environment": env, "rows": [dataclasses.asdict(row) for row in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
