"""`vugen serve`: the page in a real headless browser (Debian's Chromium driven by Playwright) over the tiny LLaVA's
bundle: it loads and says what it serves, a prompt yields the pipeline's own images (pixels compared), they download
as PNGs, an uploaded image gets the VLM's own answer, and a bad bundle is one readable line in the page while the
loaded one stays. Without Chromium (`make install-browser`) the browser tests skip saying so; CI installs it."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from tools.browser import chromium_path, launch_chromium
from vugen.cli import main
from vugen.pipeline import VugenPipeline
from vugen.serve import MAX_IMAGES, ServedBundle, build_app, launch

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def served(bundle) -> ServedBundle:
    served = ServedBundle()
    served.load(str(bundle))
    return served


@pytest.fixture(scope="module")
def pipe(bundle) -> VugenPipeline:
    return VugenPipeline.from_pretrained(bundle)


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------------- without a page
def test_generate_writes_the_pipelines_images_as_named_pngs(served, pipe):
    paths = served.generate(PROMPT, 3, 2, 2.0, 5)

    assert [p.name for p in paths] == [f"00000-a-red-circle-{k}.png" for k in range(3)]  # vugen generate's names
    expected = pipe(PROMPT, seed=5, num_images_per_prompt=3, steps=2, guidance_scale=2.0)
    for path, image in zip(paths, expected, strict=True):
        assert np.array_equal(array(Image.open(path)), array(image))
    other = served.generate(PROMPT, 1, 2, 2.0, 6)[0]  # negative control: another seed, another image
    assert not np.array_equal(array(Image.open(other)), array(expected[0]))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("  ", 1, 2, 2.0, 0), "prompt: write what to draw"),
        ((PROMPT, 0, 2, 2.0, 0), f"images must be a whole number from 1 to {MAX_IMAGES}, got 0"),
        ((PROMPT, 1, 2.5, 2.0, 0), "steps must be a whole number from 1 to 100, got 2.5"),
    ],
)
def test_bad_settings_are_named(served, arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        served.generate(*arguments)


def test_nothing_loaded_and_a_bundle_that_cannot_load_are_named_and_keep_what_is_loaded(served, bundle):
    empty = ServedBundle()
    assert empty.summary().startswith("No bundle loaded")
    with pytest.raises(ValueError, match="no bundle is loaded: give a bundle folder or a Hub repo id"):
        empty.generate(PROMPT, 1, 1, 1.0, 0)
    with pytest.raises(FileNotFoundError, match=r"bundle: no such folder '/no/such/bundle'"):
        served.load("/no/such/bundle")
    assert served.source == str(bundle) and served.pipeline is not None  # still serving the loaded one


def test_vugen_serve_names_a_bundle_that_cannot_load_before_serving(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--bundle", str(tmp_path / "nope")])
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"vugen serve: error: bundle: no such folder '{tmp_path / 'nope'}' (written as a path; a Hub id looks like "
        "'org/name')"
    )


# ---------------------------------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def page(served, bundle):
    """The page of ``served`` in headless Chromium (skipped, saying how to install it, when there is none)."""
    if chromium_path() is None:
        pytest.skip("no chromium: `make install-browser` installs Debian's chromium for the browser tests")
    from playwright.sync_api import sync_playwright

    app = build_app(served, str(bundle))
    url = launch(app, "127.0.0.1", None, share=False, block=False)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            yield page
            browser.close()
    finally:
        app.close()


def test_the_page_loads_and_says_what_it_serves(page, bundle):
    status = page.locator("#status")
    status.get_by_text("Loaded").wait_for()  # the page is built by script after it loads
    assert page.title() == "vugen"
    assert f"Loaded {bundle}: VLM" in status.inner_text()


def test_a_prompt_yields_the_pipelines_images_in_the_page_as_pngs(page, pipe):
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#generate").click()
    shown = page.locator("#images img")
    shown.nth(3).wait_for()  # 4 images by default

    expected = pipe(PROMPT, seed=0, num_images_per_prompt=4)
    for k in range(4):
        source = shown.nth(k).get_attribute("src")
        response = page.request.get(source)  # what the download button saves
        assert response.ok and response.headers["content-type"] == "image/png"
        assert np.array_equal(array(Image.open(io.BytesIO(response.body()))), array(expected[k]))


def test_a_bad_bundle_is_one_readable_line_in_the_page(page, bundle):
    box = page.get_by_label("Bundle (a folder or a Hub repo id)")
    box.fill("/no/such/bundle")
    page.get_by_role("button", name="Load", exact=True).click()
    error = page.get_by_text("bundle: no such folder '/no/such/bundle'")
    error.wait_for()
    assert "Traceback" not in page.content()
    assert f"Loaded {bundle}" in page.locator("#status").inner_text()  # the loaded bundle stays


def test_an_uploaded_image_gets_the_vlms_own_answer(page, pipe, tmp_path):
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    image.save(tmp_path / "red.png")
    page.get_by_role("tab", name="Describe").click()
    page.locator("#picture input[type=file]").set_input_files(str(tmp_path / "red.png"))
    page.get_by_role("button", name="Ask").click()
    answer = page.locator("#answer textarea")
    expected = pipe.describe([image], "Describe the image.")[0]
    assert expected  # an empty answer would match the empty box before any answer came
    page.wait_for_function("([el, text]) => el.value === text", arg=[answer.element_handle(), expected])
    assert answer.input_value() == expected
