"""The layer rules of docs/architecture.md, checked on every import in ``vugen/`` and ``adapters/``.

Each layer imports only itself and the layers listed before it in :data:`LAYERS`; a few narrower rules follow the
table. Imports are read with :mod:`ast` (nothing is imported): ``import x``, ``from x import y`` (relative ones
resolved), at module level, inside functions and under ``if TYPE_CHECKING``, and ``importlib.import_module("...")``
with a literal name. A failure names each offending line, e.g.
``vugen/bundle.py:57 imports vugen.stages.base (inference may not import training, a layer above it)``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"vugen": ROOT / "vugen", "vugen_adapters": ROOT / "adapters"}  # import name -> folder

# The layers, lowest first: a module may import its own layer and the layers on the rows before it. A name covers
# its submodules (``vugen.nn`` covers ``vugen.nn.reducer``), except the root ``vugen``: only the package's
# ``__init__`` (the version, the registry's public functions).
LAYERS: tuple[tuple[str, str], ...] = (
    (
        "foundation",
        "vugen.errors vugen.atomic vugen.hub vugen.fingerprint vugen.finite vugen.distributed vugen.applicability "
        "vugen.quiet",
    ),
    ("contract", "vugen vugen.adapter vugen.registry vugen.check_runner vugen.conformance vugen.testing"),
    ("models", "vugen.nn vugen.diffusion"),
    ("data/eval", "vugen.data vugen.eval vugen.callbacks"),
    (
        "inference",
        "vugen.generation vugen.decoder_export vugen.model_card vugen.bundle vugen.bundle_hub vugen.pipeline "
        "vugen.prediction vugen.serve",
    ),
    ("training", "vugen.stages vugen.checkpoint vugen.understanding_recipe"),
    ("commands", "vugen.commands vugen.cli vugen.lightning_cli vugen.__main__ vugen.demo vugen.demo_real"),
    ("plug-ins", "vugen_adapters"),
)
# Narrower rules on top of the table:
ISOLATED = ("vugen.nn", "vugen.diffusion")  # import nothing of vugen outside their own package
CONTRACT_BASE = ("vugen.adapter",)  # the adapter contract builds on the foundation only
# generation is the lowest part of inference: the formats and the pipeline build on it
BUILT_ON = {"vugen.generation": ("vugen.decoder_export", "vugen.bundle", "vugen.pipeline")}
NO_TRAINING_CODE = (
    "vugen.generation",
    "vugen.decoder_export",
    "vugen.model_card",
    "vugen.bundle",
    "vugen.bundle_hub",
    "vugen.pipeline",
    "vugen.serve",
)  # inference without Lightning
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
PLUGIN_SEES = ("foundation", "contract")  # vugen_adapters imports only these layers of vugen
# The one import of the plug-ins from vugen: `vugen tiny` runs their debug recipes (found otherwise by entry points).
PLUGIN_IMPORT_ALLOWED = {"vugen.commands.tiny": ("vugen_adapters.tiny",)}


@dataclass(frozen=True)
class Edge:
    """One import: ``path:line`` of module ``importer`` imports module ``target``."""

    path: str
    line: int
    importer: str
    target: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


# ---------------------------------------------------------------------------------------------------- reading
def source_files() -> dict[str, Path]:
    """Module name -> file, for every module of vugen and vugen_adapters."""
    modules = {}
    for name, folder in SOURCES.items():
        for file in sorted(folder.rglob("*.py")):
            parts = file.relative_to(folder).with_suffix("").parts
            modules[".".join((name, *parts[: -1 if parts[-1] == "__init__" else None]))] = file
    return modules


def module_edges(source: str, module: str, path: str, is_package: bool, known: Iterable[str]) -> list[Edge]:
    """Every import in ``source`` (module ``module``, shown as ``path``).

    ``from package import name`` points at ``package.name`` when that is a module in ``known``, else at ``package``.
    """
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add((node.lineno, candidate if candidate in known else base))
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and not name.value.startswith("."):
                found.add((node.lineno, name.value))
    return [Edge(path, line, module, target) for line, target in sorted(found)]


def _absolute(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def repository_edges() -> list[Edge]:
    """Every import of every module of vugen and vugen_adapters."""
    files = source_files()
    edges = []
    for module, file in files.items():
        path = str(file.relative_to(ROOT))
        edges += module_edges(file.read_text(), module, path, file.name == "__init__.py", files)
    return edges


# ---------------------------------------------------------------------------------------------------- rules
def _within(module: str, name: str) -> bool:
    return module == name or (name != "vugen" and module.startswith(name + "."))


def _within_any(module: str, names: Iterable[str]) -> bool:
    return any(_within(module, name) for name in names)


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the layer holding ``module`` (the most specific name wins); None if none."""
    best = None
    for index, (_, names) in enumerate(LAYERS):
        for name in names.split():
            if _within(module, name) and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def _internal(module: str) -> bool:
    return module.partition(".")[0] in SOURCES


def layer_order(edge: Edge) -> str | None:
    """Each layer imports only itself and the layers below it."""
    if not _internal(edge.target):
        return None
    mine, theirs = layer_of(edge.importer), layer_of(edge.target)
    if mine is None:
        return f"{edge.importer} is in no layer: add it to LAYERS in tests/test_architecture.py"
    if theirs is None:
        return f"{edge} ({edge.target} is in no layer: a typo, or a module to add to LAYERS)"
    if theirs <= mine:
        return None
    allowed = PLUGIN_IMPORT_ALLOWED.get(edge.importer, ())
    if _within_any(edge.target, allowed):
        return None
    return f"{edge} ({LAYERS[mine][0]} may not import {LAYERS[theirs][0]}, a layer above it)"


def isolated_models(edge: Edge) -> str | None:
    """``vugen.nn`` and ``vugen.diffusion`` import nothing of vugen outside their own package."""
    own = next((name for name in ISOLATED if _within(edge.importer, name)), None)
    if own is None or not _internal(edge.target) or _within(edge.target, own):
        return None
    return f"{edge} ({own} imports nothing of vugen outside {own})"


def contract_base(edge: Edge) -> str | None:
    """The adapter contract imports only the foundation."""
    if not _within_any(edge.importer, CONTRACT_BASE) or not _internal(edge.target):
        return None
    if _within_any(edge.target, CONTRACT_BASE) or layer_of(edge.target) == 0:
        return None
    return f"{edge} ({edge.importer} imports only the foundation)"


def generation_below_formats(edge: Edge) -> str | None:
    """``vugen.generation`` does not import the bundle format or the pipeline built on it."""
    for importer, forbidden in BUILT_ON.items():
        if _within(edge.importer, importer) and _within_any(edge.target, forbidden):
            return f"{edge} ({importer} may not import {' or '.join(forbidden)}, which build on it)"
    return None


def inference_without_lightning(edge: Edge) -> str | None:
    """Inference code does not depend on training code: no Lightning in generation, bundle, pipeline."""
    if _within_any(edge.importer, NO_TRAINING_CODE) and _within_any(edge.target, LIGHTNING):
        return f"{edge} (inference code does not import Lightning)"
    return None


def plugins_see_the_contract(edge: Edge) -> str | None:
    """vugen_adapters imports vugen only from the foundation and the contract."""
    if not _within(edge.importer, "vugen_adapters") or not _internal(edge.target):
        return None
    if _within(edge.target, "vugen_adapters"):
        return None
    layer = layer_of(edge.target)
    if layer is not None and LAYERS[layer][0] in PLUGIN_SEES:
        return None
    return f"{edge} (vugen_adapters imports only vugen's {' and '.join(PLUGIN_SEES)})"


RULES: dict[str, Callable[[Edge], str | None]] = {
    rule.__name__: rule
    for rule in (
        layer_order,
        isolated_models,
        contract_base,
        generation_below_formats,
        inference_without_lightning,
        plugins_see_the_contract,
    )
}


def violations(edges: Iterable[Edge], rules: Iterable[Callable[[Edge], str | None]] = RULES.values()) -> list[str]:
    """One line per edge that breaks one of ``rules``."""
    rules = list(rules)
    return sorted({message for edge in edges for rule in rules if (message := rule(edge)) is not None})


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return repository_edges()


def test_the_checker_reads_the_imports(edges):
    """A parser that found nothing would pass every rule: vugen and its plug-ins import each other ~150 times."""
    internal = [edge for edge in edges if _internal(edge.target)]
    assert len(internal) > 50, f"only {len(internal)} imports of vugen / vugen_adapters found"
    assert ("vugen.registry", "vugen.adapter") in {(edge.importer, edge.target) for edge in edges}


def test_every_module_is_in_a_layer():
    missing = [module for module in source_files() if layer_of(module) is None]
    assert not missing, f"modules in no layer (add them to LAYERS in tests/test_architecture.py): {missing}"


@pytest.mark.parametrize("rule", RULES)
def test_imports_follow_the_rule(rule, edges):
    found = violations(edges, [RULES[rule]])
    assert not found, f"{RULES[rule].__doc__}\n" + "\n".join(found)


SYNTHETIC = """
import importlib
from vugen.nn import PixelDecoder
from ..stages import sampler

def late():
    from vugen import stages
    importlib.import_module("vugen_adapters.llava")
    import lightning.pytorch
"""


def test_the_checker_reports_upward_edges():
    """Negative control: a bundle module importing the stages (relative, late), a plug-in and Lightning is reported,
    line by line; its import of the models is not."""
    known = {"vugen.stages.sampler", "vugen.stages"}
    edges = module_edges(SYNTHETIC, "vugen.bundle.writer", "vugen/bundle/writer.py", False, known)
    assert [(edge.line, edge.target) for edge in edges] == [
        (2, "importlib"),
        (3, "vugen.nn"),
        (4, "vugen.stages.sampler"),
        (7, "vugen.stages"),
        (8, "vugen_adapters.llava"),
        (9, "lightning.pytorch"),
    ]
    assert violations(edges) == [
        "vugen/bundle/writer.py:4 imports vugen.stages.sampler (inference may not import training, a layer above it)",
        "vugen/bundle/writer.py:7 imports vugen.stages (inference may not import training, a layer above it)",
        "vugen/bundle/writer.py:8 imports vugen_adapters.llava (inference may not import plug-ins, a layer above it)",
        "vugen/bundle/writer.py:9 imports lightning.pytorch (inference code does not import Lightning)",
    ]


@pytest.mark.parametrize(
    ("importer", "target", "broken"),
    [
        ("vugen.nn.reducer", "vugen.errors", "isolated_models"),
        ("vugen.adapter", "vugen.registry", "contract_base"),
        ("vugen.generation", "vugen.bundle", "generation_below_formats"),
        ("vugen_adapters.llava", "vugen.stages", "plugins_see_the_contract"),
        ("vugen_adapters.llava", "vugen.data.shapes", "plugins_see_the_contract"),
        ("vugen.cli", "vugen_adapters.tiny", "layer_order"),
        ("vugen.registry", "vugen_adapters", "layer_order"),
        ("vugen.fingerprint", "vugen.adapter", "layer_order"),
        ("vugen.stages.decoder", "vugen.eval", None),  # data/eval is below training
        ("vugen.commands.tiny", "vugen_adapters.tiny", None),
        ("vugen.commands.describe", "vugen.pipeline", None),  # a command runs inference
        ("vugen.commands.describe", "vugen_adapters.auto", "layer_order"),  # it finds the adapter by the registry
        ("vugen_adapters.auto", "vugen.adapter", None),
        ("vugen.eval.export", "vugen.pipeline", "layer_order"),
        ("vugen.eval.captioning", "vugen.stages.understanding", "layer_order"),  # scoring needs only the adapter
        ("vugen.stages.understanding", "vugen.data.shapes_understanding", None),
        ("vugen.commands.tiny", "vugen.stages.understanding", None),
    ],
)
def test_each_rule_reports_its_own_edges(importer, target, broken):
    edge = Edge("x.py", 1, importer, target)
    assert [name for name, rule in RULES.items() if rule(edge) is not None] == ([broken] if broken else [])


def test_a_module_in_no_layer_is_reported():
    assert violations([Edge("vugen/new.py", 3, "vugen.new", "vugen.errors")]) == [
        "vugen.new is in no layer: add it to LAYERS in tests/test_architecture.py"
    ]
