"""Imports point one way (DESIGN.md, "Layers"), and nothing imports itself back in a circle.

Every ``import`` of a ``medvit_explain`` module counts, at module level or inside a function (a lazy import
still couples the two). A module may import its own layer or any lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medvit_explain"

# (layer, module prefixes), lowest first; the first matching prefix (longest listed first) decides
LAYERS = [
    # words every layer shares; the output file names are words the viewers and writers share
    (0, ["vocabulary", "errors", "volume", "versions", "processes", "outputs.layout"]),
    (
        1,
        ["io", "orientation", "transforms", "volumetric_inputs", "phantom"],
    ),  # reading and writing CTs, the model-input chain, synthetic CTs
    (2, ["model"]),
    (3, ["explainers", "registry"]),
    # explaining a volume and writing one study's files; the study report is one of those files
    (4, ["pipeline", "prediction", "metrics", "outputs", "report.html", "report.figures"]),
    # train, evaluate, audit, bench over one studies module: typed results; the chain as MONAI transforms
    # and the MONAI bundle (they run the pipeline's own pieces)
    (5, ["workflows", "monai_transforms", "bundle"]),
    (6, ["report"]),  # renders the workflows' typed results
    (7, ["batch"]),  # many studies: explains each, then runs the audit workflow and writes its report
    # the command line, and the old import paths of the workflows (medvit_explain.evaluate, …: facades)
    (8, ["commands", "cli", "__main__", "train", "evaluate", "audit", "bench"]),
    (9, ["napari", "viewer_logic"]),  # viewers (the Slicer module lives in plugins/ and calls the CLI)
]
EXEMPT = {"__init__"}  # the package root's lazy API reaches every layer by design


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best = None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (layer, len(prefix))
    assert best is not None, f"medvit_explain.{module} has no layer in LAYERS: add it"
    return best[0]


def imports_of(path: Path) -> set[str]:
    """The medvit_explain modules ``path`` imports (absolute or relative, anywhere in the file)."""
    me = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name[len("medvit_explain.") :] for a in node.names if a.name.startswith("medvit_explain.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me if is_package else me[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("medvit_explain"):
                target = node.module[len("medvit_explain") :].lstrip(".")
            else:
                continue
            if target:
                found.add(target)
                found |= {
                    f"{target}.{a.name}"
                    for a in node.names
                    if (PACKAGE / target.replace(".", "/") / f"{a.name}.py").exists()
                }
    return {m for m in found if m and m.split(".")[0] not in EXEMPT}


def edges() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name in EXEMPT:
            continue
        graph[name] = {m for m in imports_of(path) if m != name and not name.startswith(m + ".")}
    return graph


def test_every_module_has_a_layer():
    for name in edges():
        layer_of(name)


def test_imports_only_point_down():
    upward = []
    for name, targets in edges().items():
        for target in sorted(targets):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = edges()
    modules = {m: {t for t in ts if t in graph} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(modules[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(modules):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_layer_table_reads_as_documented():
    """The order of DESIGN.md: transforms → pipeline → workflows → report → commands → viewers."""
    order = ["transforms", "pipeline", "workflows", "report.evaluation", "batch", "commands", "napari"]
    assert [layer_of(m) for m in order] == sorted(layer_of(m) for m in order)
    assert len({layer_of(m) for m in order}) == len(order)
