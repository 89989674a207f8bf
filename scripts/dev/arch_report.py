"""Architecture metrics of a source tree, read from the source with `ast` (nothing is imported or run):

    python -m scripts.dev.arch_report                 # this repository
    python -m scripts.dev.arch_report --root DIR      # another checkout (e.g. a `git worktree` of an older commit)

It prints the longest functions, the parameter counts of the public entry points, the import graph between the
project's top-level packages (with utils/ split into its subsystems), its import cycles and upward arrows, and the
README's length. The exit status is 1 when the tree has an import cycle, an upward arrow or a package that the
layering below does not place, else 0.

Nodes of the graph: every top-level package (a folder with __init__.py, or one the layering names) and the
top-level modules the layering names (train.py, eval.py; other loose files at the root, setup.py or someone's
scratch file, are not the project), except that utils/ counts as one node per sub-package or module
(utils.runtime, utils.inference, utils.config, ...). tests/ is not part of it. Every import counts, including those
inside functions (a deferred import is still a dependency).

Layering, bottom to top. A node may import nodes of its own layer or of lower layers, never of a higher one:
  0 foundation    utils (the package itself), utils.config, utils.files, utils.log, utils.runtime: the schema,
                  atomic file writes, logging, process groups, precision and preemption; they know nothing of
                  models or data
  1 components    network, loss, transforms: models, losses, transforms (they may read the config's dataclasses)
  2 data          datasets: data sources, samplers, loaders (built with transforms)
  3 outputs       utils.checkpoint, utils.evaluation: checkpoints, metrics tables, dumps, pictures, results page
  4 inference     utils.inference: multi-scale passes, sliding window, memory plan, video, export
  5 engine        utils.engine, utils.cli, utils.folders: the training step and evaluation loop; the start-up of
                  the entry points and their folders
  6 entry points  train, eval
  7 tools         scripts
Import cycles are reported between modules (datasets.base <-> datasets.uniform is one even though both are one
node) and between nodes.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("utils", "utils.config", "utils.files", "utils.log", "utils.runtime")),
    ("components", ("network", "loss", "transforms")),
    ("data", ("datasets",)),
    ("outputs", ("utils.checkpoint", "utils.evaluation")),
    ("inference", ("utils.inference",)),
    ("engine", ("utils.engine", "utils.cli", "utils.folders")),
    ("entry points", ("train", "eval")),
    ("tools", ("scripts",)),
]
LAYER_OF = {node: i for i, (_, nodes) in enumerate(LAYERS) for node in nodes}

# Public entry points, found by name wherever they are defined in train.py, eval.py or utils/ (they move between
# modules from one version of the tree to the next); classes are counted by their constructor.
ENTRY_FUNCTIONS = ("train", "main", "run", "evaluate", "predict", "annotate_video", "train_step", "train_one_epoch",
                   "export_onnx")
ENTRY_CLASSES = ("FixedScaleModel",)
ENTRY_ROOTS = ("train", "eval", "utils")

SKIP_DIRS = {"tests"}


@dataclass
class Module:
    name: str  # dotted, e.g. utils.runtime.dist (a package: its own name, from __init__.py)
    path: str  # relative to the root
    is_package: bool
    tree: ast.Module


@dataclass
class Report:
    longest: list[tuple[int, str]]  # (lines, "file:qualified name"), longest first
    entry_points: list[tuple[str, int]]  # ("file:name", parameter count)
    edges: dict[tuple[str, str], list[str]]  # (node, node) -> the "file:line" of each import behind the arrow
    module_cycles: list[list[str]]  # each a strongly connected set of modules, sorted
    node_cycles: list[list[str]]
    cycle_paths: dict[str, list[list[str]]]  # "modules" / "nodes": one import path round each set above
    upward: list[tuple[str, str]]
    unlayered: list[str]
    readme_lines: int | None
    nodes: set[str] = field(default_factory=set)

    @property
    def clean(self) -> bool:
        return not (self.module_cycles or self.node_cycles or self.upward or self.unlayered)


def find_modules(root: str) -> dict[str, Module]:
    """Every project module under `root`: train.py, eval.py and the .py files of the top-level packages."""
    modules: dict[str, Module] = {}
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if entry.endswith(".py") and os.path.isfile(full) and entry[:-3] in LAYER_OF:
            paths: Iterable[str] = [entry]
        elif os.path.isdir(full) and entry not in SKIP_DIRS and (
            entry in LAYER_OF or os.path.isfile(os.path.join(full, "__init__.py"))
        ):
            paths = _python_files(root, entry)
        else:
            continue
        for rel in paths:
            parts = rel[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=rel)
            name = ".".join(parts)
            modules[name] = Module(name, rel, is_package, tree)
    return modules


def _python_files(root: str, top: str) -> Iterator[str]:
    for folder, dirs, files in os.walk(os.path.join(root, top)):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), root)


def node_of(module: str) -> str:
    """The graph node a module belongs to: its top-level name, or utils.<sub-package or module>."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "utils" and len(parts) > 1 else parts[0]


def imports_of(module: Module, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import statement of `module`, at any depth."""
    tops = {name.split(".")[0] for name in known}
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in tops:
                    yield _longest_known(alias.name, known), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target or target.split(".")[0] not in tops:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else _longest_known(target, known)), node.lineno


def _longest_known(name: str, known: set[str]) -> str:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return parts[0]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of `graph`: its strongly connected components of two or more vertices (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first vertex of `component` (a strongly connected one): [a, b, ..., a]."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise ValueError(f"{component} is not strongly connected")


def function_lengths(modules: dict[str, Module]) -> list[tuple[int, str]]:
    """(lines from `def` to the last line, "file:Class.function") of every function and method, nested ones too."""
    out: list[tuple[int, str]] = []

    def walk(body: Iterable[ast.stmt], path: str, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{path}:{prefix}{node.name}"))
                walk(node.body, path, f"{prefix}{node.name}.")
            elif isinstance(node, ast.ClassDef):
                walk(node.body, path, f"{prefix}{node.name}.")
            else:  # functions defined under if / try / with
                for child in ("body", "orelse", "finalbody", "handlers"):
                    walk(getattr(node, child, []) or [], path, prefix)

    for module in modules.values():
        walk(module.tree.body, module.path, "")
    return sorted(out, key=lambda item: (-item[0], item[1]))


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool = False) -> int:
    """Every parameter, *args and **kwargs counting one each; a method's self is not counted."""
    a = fn.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return n - 1 if method else n


def entry_points(modules: dict[str, Module]) -> list[tuple[str, int]]:
    out = []
    for module in modules.values():
        if module.name.split(".")[0] not in ENTRY_ROOTS:
            continue
        for node in module.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in ENTRY_FUNCTIONS:
                out.append((f"{module.path}:{node.name}", parameter_count(node)))
            elif isinstance(node, ast.ClassDef) and node.name in ENTRY_CLASSES:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        out.append((f"{module.path}:{node.name}", parameter_count(item, method=True)))
    return sorted(out)


def analyse(root: str) -> Report:
    modules = find_modules(root)
    known = set(modules)
    module_graph: dict[str, set[str]] = {name: set() for name in modules}
    edges: dict[tuple[str, str], list[str]] = {}
    for module in modules.values():
        for target, line in imports_of(module, known):
            if target != module.name:
                module_graph[module.name].add(target)
            a, b = node_of(module.name), node_of(target)
            if a != b:
                edges.setdefault((a, b), []).append(f"{module.path}:{line}")
    nodes = {node_of(name) for name in modules}
    node_graph: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        node_graph[a].add(b)
    module_cycles, node_cycles = strongly_connected(module_graph), strongly_connected(node_graph)
    upward = sorted((a, b) for a, b in edges if a in LAYER_OF and b in LAYER_OF and LAYER_OF[b] > LAYER_OF[a])
    readme = os.path.join(root, "README.md")
    readme_lines = None
    if os.path.isfile(readme):
        with open(readme, encoding="utf-8") as f:
            readme_lines = len(f.read().splitlines())
    return Report(
        longest=function_lengths(modules),
        entry_points=entry_points(modules),
        edges=edges,
        module_cycles=module_cycles,
        node_cycles=node_cycles,
        cycle_paths={"modules": [shortest_cycle(module_graph, c) for c in module_cycles],
                     "nodes": [shortest_cycle(node_graph, c) for c in node_cycles]},
        upward=upward,
        unlayered=sorted(n for n in nodes if n not in LAYER_OF),
        readme_lines=readme_lines,
        nodes=nodes,
    )


def format_report(report: Report, top: int = 10) -> str:
    lines = [f"Longest functions (top {top}, lines):"]
    lines += [f"  {n:4d}  {name}" for n, name in report.longest[:top]]
    lines.append("Parameters of the public entry points:")
    lines += [f"  {n:4d}  {name}" for name, n in report.entry_points]
    lines.append("Import graph (node -> what it imports; [layer]):")

    def label(node: str) -> str:
        return f"{node} [{LAYER_OF[node]}]" if node in LAYER_OF else f"{node} [no layer]"

    for node in sorted(report.nodes, key=lambda n: (LAYER_OF.get(n, len(LAYERS)), n)):
        targets = sorted((b for a, b in report.edges if a == node), key=lambda n: (LAYER_OF.get(n, len(LAYERS)), n))
        lines.append(f"  {label(node)} -> {', '.join(targets) if targets else '(nothing of the project)'}")
    for kind, cycles in (("modules", report.module_cycles), ("nodes", report.node_cycles)):
        lines.append(f"Import cycles between {kind}: {len(cycles)}")
        for members, path in zip(cycles, report.cycle_paths[kind]):
            lines.append(f"  {{{', '.join(members)}}}, e.g. {' -> '.join(path)}")
    lines.append(f"Upward arrows: {len(report.upward)}")
    for a, b in report.upward:
        where = report.edges[(a, b)]
        more = f" (+{len(where) - 3} more)" if len(where) > 3 else ""
        lines.append(f"  {label(a)} -> {label(b)}: {', '.join(where[:3])}{more}")
    lines.append(f"Nodes the layering does not place: {', '.join(report.unlayered) if report.unlayered else 'none'}")
    readme = "no README.md" if report.readme_lines is None else f"{report.readme_lines} lines"
    lines.append(f"README: {readme}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        help="the source tree to read (default: this repository)")
    parser.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"arch_report: --root {args.root} is not a folder: give the root of a checkout", file=sys.stderr)
        return 2
    report = analyse(args.root)
    print(format_report(report, args.top))
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
