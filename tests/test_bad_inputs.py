"""Bad input through the `vugen` command, as a user meets it: one line naming what is wrong, a non-zero exit, no
traceback, nothing lost. Each case runs the real console script in a subprocess."""

from __future__ import annotations

import pytest

from tests.cli_harness import assert_one_line_error, demo_config, run_vugen


@pytest.fixture(scope="module")
def reducer_config(tiny_checkpoint, tmp_path_factory):
    return demo_config("reducer", tmp_path_factory.mktemp("bad-inputs"), tiny_checkpoint("llava"))


# ---------------------------------------------------------------------------------------------------- configs
def test_unknown_config_key_names_it(reducer_config):
    result = run_vugen(
        "fit", "--config", reducer_config, "--model.init_args.latent_dimm", "4", cwd=reducer_config.parent
    )
    assert_one_line_error(result, "model", "latent_dimm", code=2)


def test_missing_config_file_names_it(tmp_path):
    result = run_vugen("fit", "--config", "no-such.yaml", cwd=tmp_path)
    assert_one_line_error(result, "no-such.yaml", "does not exist", code=2)


def test_an_adapter_argument_error_is_its_own_message(reducer_config):
    result = run_vugen(
        "fit", "--config", reducer_config, "--model.init_args.latent_dim", "999", cwd=reducer_config.parent
    )
    line = assert_one_line_error(result, "latent_dim", "999", code=1)
    assert "Union" not in line and "Namespace" not in line


def test_unknown_adapter_name_lists_the_registered_ones(reducer_config):
    result = run_vugen(
        "fit", "--config", reducer_config, "--model.init_args.adapter.class_path", "lava", cwd=reducer_config.parent
    )
    assert_one_line_error(result, "unknown adapter 'lava'", "llava", "qwen2_vl", code=2)


def test_traceback_flag_shows_the_trace(reducer_config):
    args = ("fit", "--config", reducer_config, "--model.init_args.latent_dim", "999")
    result = run_vugen(*args, "--traceback", cwd=reducer_config.parent)
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "latent_dim must satisfy" in result.stderr
