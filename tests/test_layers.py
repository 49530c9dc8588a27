"""The import rule (docs/architecture.md): the library's layers, lowest first, are

    core < data < model < track < config < train < cluster < cli (cli.py, demo.py, the scripts)

A module imports only from lower layers, or from its own layer without a cycle; function-level
and TYPE_CHECKING imports count like any other. Each heavy dependency has one owner. The checks
parse every module's imports with :mod:`ast` (nothing is imported) and fail naming the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "multieye_dist"
LAYERS = ("core", "data", "model", "track", "config", "train", "cluster", "cli")
# Where a module of the package sits: its subpackage, or these top-level modules.
TOP_LEVEL = {"__init__": "core", "config": "config", "confighelp": "config", "cli": "cli",
             "demo": "cli"}  # fmt: skip
SCRIPTS = ("launch", "shards", "benchmarks")  # above everything: the cli layer
# Heavy dependency -> the modules (path prefixes, relative to the root) allowed to import it.
OWNERS = {
    "deepspeed": ("multieye_dist/train/engine.py",),
    "submitit": ("multieye_dist/cluster/",),
    "wandb": ("multieye_dist/track/tracking.py",),
    "optuna": ("multieye_dist/cluster/search.py",),
    "triton": ("multieye_dist/model/kernels/",),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parts
    if rel[0] in SCRIPTS:
        return "cli"
    if len(rel) == 2:
        return TOP_LEVEL[Path(rel[1]).stem]
    return rel[1]


def imports_of(path: Path, root: Path, modules: set[str]) -> list[tuple[int, str, str]]:
    """(line, target module of the package or a top-level dependency name, source text) for
    every import statement anywhere in the file: module level, in functions, under
    TYPE_CHECKING."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines()
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import name`: name may be a submodule (then that is the target)
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        text = lines[node.lineno - 1].strip()
        for name in dict.fromkeys(names):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                while name not in modules and "." in name:
                    name = name.rpartition(".")[0]
            found.append((node.lineno, name, text))
    return found


def library_files(root: Path) -> list[Path]:
    files = sorted((root / PACKAGE).rglob("*.py"))
    for folder in SCRIPTS:
        files += sorted((root / folder).rglob("*.py"))
    return files


def check(root: Path) -> list[str]:
    """Every violation of the rule under `root`, as 'file:line: import: why'."""
    files = library_files(root)
    lib = [f for f in files if f.relative_to(root).parts[0] == PACKAGE]
    modules = {module_name(f, root) for f in lib}
    by_name = {module_name(f, root): f for f in lib}
    problems, edges = [], {m: set() for m in modules}
    for path in files:
        src_layer, rel = layer_of(path, root), path.relative_to(root).as_posix()
        in_library = path in lib
        for line, target, text in imports_of(path, root, modules):
            where = f"{rel}:{line}: {text}"
            top = target.split(".")[0]
            if top in OWNERS and not rel.startswith(OWNERS[top]):
                problems.append(f"{where}: {top} is owned by {', '.join(OWNERS[top])}")
            if target not in modules or target == PACKAGE:
                continue
            dst_layer = layer_of(by_name[target], root)
            if LAYERS.index(dst_layer) > LAYERS.index(src_layer):
                problems.append(f"{where}: {src_layer} imports {dst_layer}, a higher layer")
            elif in_library and dst_layer == src_layer and target != module_name(path, root):
                edges[module_name(path, root)].add(target)
    problems += [f"import cycle within a layer: {' -> '.join(c)}" for c in cycles(edges)]
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_library_keeps_the_import_rule():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for path in library_files(ROOT):
        assert layer_of(path, ROOT) in LAYERS, path


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"multieye_dist/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for pkg in LAYERS[:4] + ("train", "cluster"):
        (root / PACKAGE / pkg).mkdir(exist_ok=True)
        (root / PACKAGE / pkg / "__init__.py").touch()
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # an upward import hidden in a function
            {"multieye_dist/core/a.py": "def f():\n    from multieye_dist.train import loop\n",
             "multieye_dist/train/loop.py": ""},
            "multieye_dist/core/a.py:2: from multieye_dist.train import loop: core imports "
            "train, a higher layer",
        ),
        (  # under TYPE_CHECKING
            {"multieye_dist/data/s.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
             "    from multieye_dist.config import Config\n",
             "multieye_dist/config.py": ""},
            "multieye_dist/data/s.py:3: from multieye_dist.config import Config: data imports "
            "config, a higher layer",
        ),
        (  # a cycle inside one layer
            {"multieye_dist/track/a.py": "import multieye_dist.track.b\n",
             "multieye_dist/track/b.py": "from multieye_dist.track import a\n"},
            "import cycle within a layer: multieye_dist.track.a -> multieye_dist.track.b -> "
            "multieye_dist.track.a",
        ),
        (  # a heavy dependency outside its owner, from a script too
            {"launch/x.py": "import submitit\n"},
            "launch/x.py:1: import submitit: submitit is owned by multieye_dist/cluster/",
        ),
        (
            {"multieye_dist/track/plots.py": "def f():\n    import wandb\n"},
            "multieye_dist/track/plots.py:2: import wandb: wandb is owned by "
            "multieye_dist/track/tracking.py",
        ),
    ],
)  # fmt: skip
def test_a_violation_is_named(tmp_path, files, expected):
    assert check(_tree(tmp_path, files)) == [expected]


def test_downward_and_sibling_imports_pass(tmp_path):
    files = {
        "multieye_dist/train/loop.py": "from multieye_dist.core import a\nimport multieye_dist."
        "train.setup\nfrom multieye_dist import config\n",
        "multieye_dist/train/setup.py": "from multieye_dist.model.m import x\n",
        "multieye_dist/core/a.py": "",
        "multieye_dist/model/m.py": "import torch\n",
        "multieye_dist/config.py": "from multieye_dist.track import t\n",
        "multieye_dist/track/t.py": "",
        "multieye_dist/cluster/c.py": "import submitit\nfrom multieye_dist.train.loop import run\n",
        "benchmarks/b.py": "from multieye_dist.cluster import c\n",
    }
    assert check(_tree(tmp_path, files)) == []
