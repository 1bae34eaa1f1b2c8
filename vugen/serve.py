"""The browser demo of a bundle (``vugen serve``): a Gradio page that generates images from text and asks the
bundle's VLM about an uploaded image.

``pip install 'vugen[serve]'`` adds Gradio. The page holds one bundle at a time (a folder or a Hub repo id, loaded
with :meth:`VugenPipeline.from_pretrained`, so every check of a bundle applies); another can be loaded from the page,
and a bundle that cannot be loaded is one readable line there, the previous one staying in use. Generation runs one
request at a time (Gradio's queue) on the device given. Images show in a gallery and download as PNG files named as
``vugen generate`` names them, with the same seeds: image ``k`` of the prompt uses ``seed + k``.

Inference only: nothing here imports training code.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from vugen.callbacks.prediction_writers import slug
from vugen.errors import VugenError, known_error_message
from vugen.generation import SamplingConfig
from vugen.pipeline import VugenPipeline

if TYPE_CHECKING:
    import gradio

__all__ = ["ServedBundle", "build_app", "import_gradio", "launch"]

MAX_IMAGES = 8
MAX_STEPS = 100
# Tiny bundles make 16-32 px images: shown large, pixels stay sharp instead of blurred
_CSS = "#images img { image-rendering: pixelated; }"


def import_gradio() -> Any:
    """The ``gradio`` module, imported with its analytics off (it would call home at import and on launch).

    Raises:
        VugenError: Gradio is not installed, saying how to install it.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise VugenError("vugen serve needs Gradio: pip install 'vugen[serve]'") from error
    return gradio


class ServedBundle:
    """The bundle the page serves; loading another replaces it for every visitor (one model per server).

    Args:
        device: Where the pipeline runs (``cpu``, ``cuda``, ...).
        trust_remote_code: Let the VLM checkpoint run its own code (the command line's choice, never a bundle's).
    """

    def __init__(self, device: str = "cpu", trust_remote_code: bool = False) -> None:
        self.device, self.trust_remote_code = device, trust_remote_code
        self.pipeline: VugenPipeline | None = None
        self.source: str | None = None
        self._lock = threading.Lock()  # a load and a generation never overlap
        # the PNGs handed to the page (Gradio copies them into its cache); removed with this object or at exit
        self._out = tempfile.TemporaryDirectory(prefix="vugen-serve-")

    def load(self, bundle: str, revision: str | None = None) -> str:
        """Load ``bundle`` (a folder or a Hub repo id) in place of the current one; returns a one-line summary.

        Raises:
            Exception: What :meth:`VugenPipeline.from_pretrained` raises; the current bundle stays in use.
        """
        bundle = bundle.strip()
        if not bundle:
            raise ValueError("bundle: give a bundle folder or a Hub repo id (org/name)")
        pipeline = VugenPipeline.from_pretrained(
            bundle, revision=revision or None, trust_remote_code=self.trust_remote_code
        ).to(self.device)
        with self._lock:
            self.pipeline, self.source = pipeline, bundle
        return self.summary()

    def summary(self) -> str:
        """What is loaded, in one line: the bundle, its base VLM, image size and default sampling."""
        if self.pipeline is None:
            return "No bundle loaded: give a bundle folder or a Hub repo id and press Load."
        sampling, vlm = self.pipeline.sampling, self.pipeline.adapter.init_config()["init_args"].get("pretrained")
        return (
            f"Loaded **{self.source}**: VLM `{vlm}`, {self.pipeline.image_size} px images, {sampling.steps} "
            f"{sampling.solver} steps, guidance {sampling.guidance_scale} by default."
        )

    def generate(self, prompt: str, images: int, steps: int, guidance_scale: float, seed: int) -> list[Path]:
        """PNG files of ``images`` images of ``prompt`` (image ``k`` with seed ``seed + k``).

        Raises:
            ValueError: No bundle is loaded, the prompt is empty, or a setting is out of range (named).
        """
        pipeline = self._loaded()
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("prompt: write what to draw")
        images, steps, seed = _whole("images", images, 1, MAX_IMAGES), _whole("steps", steps, 1, MAX_STEPS), int(seed)
        with self._lock:
            pictures = pipeline(
                prompt, seed=seed, num_images_per_prompt=images, steps=steps, guidance_scale=guidance_scale
            )
        folder = Path(tempfile.mkdtemp(dir=self._out.name))  # one folder per request: names repeat across requests
        paths = [folder / f"00000-{slug(prompt)}-{k}.png" for k in range(images)]
        for picture, path in zip(pictures, paths, strict=True):
            picture.save(path)
        return paths

    def describe(self, image: Image.Image | None, question: str, max_new_tokens: int = 64) -> str:
        """The VLM's answer to ``question`` about ``image`` (its own processor, chat template and greedy decoding).

        Raises:
            ValueError: No bundle is loaded, or no image or question is given.
        """
        pipeline = self._loaded()
        if image is None:
            raise ValueError("image: upload an image to ask about")
        if not question.strip():
            raise ValueError("question: ask something about the image")
        with self._lock:
            return pipeline.describe([image.convert("RGB")], question.strip(), max_new_tokens)[0]

    def _loaded(self) -> VugenPipeline:
        if self.pipeline is None:
            raise ValueError("no bundle is loaded: give a bundle folder or a Hub repo id and press Load")
        return self.pipeline


def _whole(name: str, value: float, low: int, high: int) -> int:
    """``value`` as an integer in ``[low, high]``, else a ValueError naming ``name``."""
    if value is None or int(value) != value or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def build_app(served: ServedBundle, bundle: str | None = None) -> gradio.Blocks:
    """The page: a bundle box with Load, a Generate tab (prompt, images, steps, guidance, seed -> a gallery of PNGs)
    and a Describe tab (an image and a question -> the VLM's answer). Errors show as one line in the page.

    Args:
        served: The bundle holder the page uses.
        bundle: Shown in the bundle box (what ``served`` loaded, if anything).
    """
    gr = import_gradio()
    # the loaded bundle's defaults; SamplingConfig's own before one is loaded
    sampling = served.pipeline.sampling if served.pipeline is not None else SamplingConfig()
    with gr.Blocks(title="vugen") as app:
        gr.Markdown("# vugen\nText to image with a VLM's own vision latents; the same VLM describes images.")
        with gr.Row():
            source = gr.Textbox(value=bundle or "", label="Bundle (a folder or a Hub repo id)", scale=4)
            load = gr.Button("Load", scale=1)
        status = gr.Markdown(served.summary(), elem_id="status")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", placeholder="a large red circle on the left", elem_id="prompt")
            with gr.Row():
                images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
                steps = gr.Slider(1, MAX_STEPS, value=sampling.steps, step=1, label="Steps")
                guidance = gr.Slider(1.0, 10.0, value=sampling.guidance_scale, label="Guidance")
                seed = gr.Number(value=0, precision=0, label="Seed")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(
                label="Images", format="png", columns=4, object_fit="contain", height="auto", elem_id="images",
                buttons=["download", "download_all", "fullscreen"],
            )  # fmt: skip
        with gr.Tab("Describe"):
            with gr.Row():
                picture = gr.Image(type="pil", label="Image", elem_id="picture")
                with gr.Column():
                    question = gr.Textbox(value="Describe the image.", label="Question")
                    ask = gr.Button("Ask", variant="primary")
                    answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
        load.click(_shown(gr, served.load), [source], [status])
        generate.click(_shown(gr, served.generate), [prompt, images, steps, guidance, seed], [gallery])
        prompt.submit(_shown(gr, served.generate), [prompt, images, steps, guidance, seed], [gallery])
        ask.click(_shown(gr, served.describe), [picture, question], [answer])
    return app


def _shown(gr: Any, action: Any) -> Any:
    """``action`` for a Gradio event: a known error (bad input, a bundle that cannot load) becomes one line in the
    page (``gradio.Error``); another keeps its traceback in the server's log and shows its type and message."""

    def run(*args: Any) -> Any:
        try:
            return action(*args)
        except Exception as error:
            message = known_error_message(error)
            raise gr.Error(message or f"{type(error).__name__}: {error}", print_exception=message is None) from error

    run.__name__ = getattr(action, "__name__", "run")  # Gradio names the API endpoint after it
    return run


def launch(app: gradio.Blocks, host: str, port: int | None, share: bool, block: bool = True) -> str:
    """Start serving ``app``; returns its local URL (and blocks until interrupted when ``block``)."""
    gr = import_gradio()
    # Gradio's queue calls pandas 3 in ways it deprecates, once per request: noise in the server's log, not ours
    warnings.filterwarnings("ignore", module=r"gradio\.queueing")
    app.queue(default_concurrency_limit=1)  # one generation at a time: the model is shared
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"])  # no web fonts to fetch
    _, url, _ = app.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, theme=theme, css=_CSS
    )
    print(f"vugen serve: the page is at {url} (Ctrl+C stops it)", flush=True)
    if block:
        app.block_thread()
    return url
