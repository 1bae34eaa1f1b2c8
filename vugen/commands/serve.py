"""`vugen serve --bundle DIR|ORG/NAME`: the browser demo of a bundle (:mod:`vugen.serve`, ``pip install
'vugen[serve]'``)."""

from __future__ import annotations

__all__ = ["serve"]


def serve(
    bundle: str | None = None,
    revision: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> None:
    """`vugen serve --bundle DIR`: a page in the browser to generate images from text and ask the VLM about images.

    Opens at http://127.0.0.1:7860 by default (Ctrl+C stops it). The page can load another bundle; the one given
    here is loaded before the server starts, so a bundle that cannot load fails here in one line.

    Args:
        bundle: A bundle folder or a Hub repo id (`org/name`); none: load one from the page.
        revision: For a Hub repo id: a branch, tag or commit sha.
        host: The address to listen on (`0.0.0.0`: every interface of this machine; the page has no login).
        port: The port (none: the first free one from 7860).
        share: Also open a public link through Gradio's share servers.
        device: Where the model runs: `cpu`, `cuda`, `cuda:1`, ...
        trust_remote_code: Let the VLM checkpoint run its own modelling code (pin its revision). Never taken from
            the bundle.
    """
    from vugen.serve import ServedBundle, build_app, import_gradio, launch

    import_gradio()  # before loading a model: a missing extra is said at once
    served = ServedBundle(device, trust_remote_code)
    if bundle is not None:
        print(f"vugen serve: loading {bundle} ...", flush=True)
        served.load(bundle, revision)
    launch(build_app(served, bundle), host, port, share)
