"""Which errors the `vugen` command reports in one line (known, the user can fix them) and which keep a traceback."""

from __future__ import annotations

import json
from argparse import ArgumentError

import pytest
import torch

from vugen.data.batches import batch_images
from vugen.errors import VugenError, known_error_message


def raised(function, *args):
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return error
    raise AssertionError("nothing was raised")


def test_an_argument_check_of_vugen_is_known():
    error = raised(batch_images, {"pixels": 1}, "ReducerStage")
    assert known_error_message(error).startswith("ReducerStage expects batches as dicts with 'images'")


def test_a_library_error_is_a_bug_and_keeps_its_traceback():
    assert known_error_message(raised(json.loads, "{")) is None  # a ValueError, raised inside json
    assert known_error_message(raised(torch.zeros(2).view, 3)) is None  # a RuntimeError inside torch


def test_vugen_errors_and_file_errors_are_known_wherever_they_come_from():
    assert known_error_message(VugenError("bundle x is stale")) == "bundle x is stale"
    assert known_error_message(raised(open, "/no/such/file")) == "[Errno 2] No such file or directory: '/no/such/file'"


def test_the_root_cause_is_reported_not_the_wrappers():
    def wrapped():
        try:
            batch_images(None, "DecoderStage")
        except ValueError as error:
            raise ValueError(
                "Does not validate against any of the Union subtypes\nGiven value: Namespace(...)"
            ) from error

    assert known_error_message(raised(wrapped)).startswith("DecoderStage expects batches")


def test_a_parser_report_becomes_key_and_reason():
    report = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [...]\n  Errors:\n'
        "    - Problem with given class_path 'vugen.stages.ReducerStage':\n        Parser key \"adapter\":\n"
        "          Expected a dot import path string: lava\n    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'dict'>\n  Given value: {'class_path': 'x'}"
    )
    assert known_error_message(ArgumentError(None, report)) == "model.adapter: Expected a dot import path string: lava"


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)])
def test_interruptions_are_not_errors(error):
    assert known_error_message(error) is None
