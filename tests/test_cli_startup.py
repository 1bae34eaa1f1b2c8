"""`vugen` starts light, and a first run is quiet.

vugen's own commands and ``vugen --help`` import no torch, Lightning, transformers or peft (each command imports only
its own module, the LightningCLI only for fit / validate / test / predict): checked on the modules a fresh
interpreter holds afterwards, never on a time. A short ``vugen fit`` of the first demo stage prints none of the
warnings vugen expects (the frozen VLM in eval mode, Lightning's own deprecation) and no advertisement.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings

import pytest
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning

import vugen
from tests.cli_harness import ROOT, run_vugen
from vugen.cli import LIGHTNING_SUBCOMMANDS, help_text, run
from vugen.commands import COMMANDS, command
from vugen.quiet import expected_output_hidden

HEAVY = ("lightning", "peft", "torch", "transformers")


@pytest.fixture
def tiny_llava(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llava"))


def heavy_imports_after(code: str) -> list[str]:
    """The packages of :data:`HEAVY` that a fresh interpreter has imported after running ``code``."""
    script = f"{code}\nimport sys\nprint('HEAVY', *sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr.splitlines()[-1].split()[1:]


def vugen_in_process(*argv: str) -> str:
    """Code running ``vugen ARGV`` as the console script does (a ``--help`` ends in SystemExit)."""
    return f"from vugen.cli import main\ntry:\n    main({list(argv)!r})\nexcept SystemExit:\n    pass"


@pytest.mark.parametrize(
    "argv", [["adapters"], ["--help"], [], ["tiny", "--help"]], ids=["adapters", "help", "no-command", "tiny-help"]
)
def test_light_commands_import_no_heavy_library(argv):
    assert heavy_imports_after(vugen_in_process(*argv)) == []


def test_the_package_and_its_registry_listing_import_no_heavy_library():
    assert heavy_imports_after("import vugen\nassert 'llava' in vugen.list_adapters()") == []


def test_a_lightning_subcommand_imports_lightning():
    """The negative control: the same check sees the LightningCLI's imports."""
    assert "lightning" in heavy_imports_after("import vugen.cli\nvugen.cli.VugenCLI")


def test_help_names_every_command_with_its_summary(capsys):
    run(["--help"])
    printed = capsys.readouterr().out
    assert printed == help_text() + "\n"
    for name in [*LIGHTNING_SUBCOMMANDS, *COMMANDS]:
        assert re.search(rf"^  {re.escape(name)} ", printed, re.MULTILINE), name
    assert re.search(r"^  tiny +write a tiny random offline checkpoint of a VLM", printed, re.MULTILINE)


def test_every_command_resolves_to_its_function():
    for name, target in COMMANDS.items():
        function = command(name)
        assert callable(function) and f"{function.__module__}:{function.__name__}" == target


def test_the_package_resolves_its_public_names_on_first_use():
    assert set(vugen.__all__) <= set(dir(vugen))
    assert vugen.list_adapters is vugen.registry.list_adapters
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vugen.nothing  # noqa: B018


# ---------------------------------------------------------------------------------------------------- quiet run
def test_only_the_expected_output_is_hidden(caplog):
    """The filters are precise: another warning of the same category, or another info line, still shows."""
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")  # under the filters of expected_output_hidden
        with expected_output_hidden():
            warnings.warn_explicit(
                "Found 78 module(s) in eval mode at the start of training.", PossibleUserWarning, "fit_loop.py", 1,
                module="lightning.pytorch.loops.fit_loop",
            )  # fmt: skip
            warnings.warn("The 'train_dataloader' does not have many workers", PossibleUserWarning, stacklevel=1)
            rank_zero_info("💡 Tip: try installing something")
            rank_zero_info("`Trainer.fit` stopped: `max_steps=2` reached.")
    assert [str(warning.message) for warning in shown] == ["The 'train_dataloader' does not have many workers"]
    assert [record.getMessage() for record in caplog.records] == ["`Trainer.fit` stopped: `max_steps=2` reached."]


def test_the_first_demo_stage_prints_no_warning_to_look_up(tiny_llava, tmp_path):
    """``vugen fit --config configs/demo/reducer.yaml`` as a user runs it: no warning but Lightning's advice on
    dataloader workers (shown on machines with more than 2 cores: the demo's choice of none is the user's to revisit),
    no tip, and vugen's own line on the VLM in eval mode."""
    result = run_vugen(
        *("fit", "--config", ROOT / "configs/demo/reducer.yaml"),
        f"--model.init_args.adapter.init_args.pretrained={tiny_llava}",
        f"--model.init_args.export_dir={tmp_path / 'reducer'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        *("--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"),
        *("--data.init_args.train_size=64", "--trainer.log_every_n_steps=1"),
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    warned = [line for line in output.splitlines() if re.match(r"\S+\.py:\d+: ", line)]  # how a warning prints
    assert [line for line in warned if "does not have many workers" not in line] == [], output[-3000:]
    assert "Tip:" not in output
    assert re.search(r"ReducerStage: the VLM \(\d+ modules\) stays in eval mode by design\n", output), output[-3000:]


def test_the_demos_first_step_prints_no_warning_to_look_up(tmp_path):
    """``vugen tiny llava DIR --understand shapes`` (the demo's first step: a Lightning fit outside LightningCLI) runs
    inside the same filters: Lightning's pytree deprecation showed here once the filters were the LightningCLI's."""
    result = run_vugen("tiny", "llava", "vlm", "--understand", "shapes", "--understand_steps", "2", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert [line for line in output.splitlines() if re.match(r"\S+\.py:\d+: ", line)] == [], output[-3000:]
    assert "Tip:" not in output and "caption accuracy" in output
