"""scripts/dev/arch_report.py: the layering holds in this repository, and the report finds cycles, upward arrows,
unplaced packages, function lengths and parameter counts in a small tree written here."""
from __future__ import annotations

import os

import pytest

from scripts.dev.arch_report import LAYER_OF, analyse, format_report, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow
def test_repository_has_no_import_cycle_and_no_upward_arrow():
    report = analyse(ROOT)
    assert report.module_cycles == [], format_report(report)
    assert report.node_cycles == [], format_report(report)
    assert report.upward == [], format_report(report)
    assert report.unlayered == [], "place these in scripts/dev/arch_report.py LAYERS"
    assert {"train", "eval", "network", "datasets", "utils.runtime", "utils.inference"} <= report.nodes


def _write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


TREE = {
    "README.md": "# x\n\nthree lines\n",
    "setup.py": "import network\n",  # not part of the graph, nor a scratch file at the root
    "_scratch.py": "import train\n",
    "tests/test_a.py": "import train\n",  # nor are the tests
    "utils/__init__.py": "",
    "utils/config.py": "from network import x\n",  # foundation -> components: upward
    "utils/runtime/__init__.py": "from .dist import evaluate\n",
    "utils/runtime/dist.py": "def evaluate(a, b=1, *c, d, **e):\n    return a\n",
    "network/__init__.py": "",
    "network/layers.py": "from . import mscale\nx = 1\n",
    "network/mscale.py": "def f():\n    import utils.config\n    from .layers import x\n    return x\n",
    "extras/__init__.py": "",
    "train.py": (
        "from utils.runtime.dist import evaluate\n\n\n"
        "def main(argv=None):\n    def inner():\n        return 1\n    y = inner()\n    return y\n\n\n"
        "class FixedScaleModel:\n    def __init__(self, model, scale):\n        pass\n"
    ),
}


def test_report_finds_cycles_upward_arrows_and_measures_functions(tmp_path, capsys):
    _write(tmp_path, TREE)
    report = analyse(str(tmp_path))
    assert report.module_cycles == [["network.layers", "network.mscale"]]  # through a deferred import
    assert report.node_cycles == [["network", "utils.config"]]
    assert report.cycle_paths == {"modules": [["network.layers", "network.mscale", "network.layers"]],
                                  "nodes": [["network", "utils.config", "network"]]}
    assert report.upward == [("utils.config", "network")]
    assert LAYER_OF["utils.config"] < LAYER_OF["network"]
    assert report.unlayered == ["extras"]
    assert report.nodes == {"utils", "utils.config", "utils.runtime", "network", "extras", "train"}
    assert report.edges[("utils.config", "network")] == ["utils/config.py:1"]
    assert report.edges[("network", "utils.config")] == ["network/mscale.py:2"]
    assert ("train", "utils.runtime") in report.edges and not any(a == "tests" for a, _ in report.edges)
    assert report.entry_points == [("train.py:FixedScaleModel", 2), ("train.py:main", 1),
                                   ("utils/runtime/dist.py:evaluate", 5)]
    assert report.longest == [(5, "train.py:main"), (4, "network/mscale.py:f"),
                              (2, "train.py:FixedScaleModel.__init__"), (2, "train.py:main.inner"),
                              (2, "utils/runtime/dist.py:evaluate")]
    assert report.readme_lines == 3
    assert not report.clean

    assert main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Upward arrows: 1\n  utils.config [0] -> network [1]: utils/config.py:1" in out
    assert ("Import cycles between modules: 1\n  {network.layers, network.mscale}, e.g. network.layers -> "
            "network.mscale -> network.layers\n") in out
    assert "Nodes the layering does not place: extras" in out
    assert "README: 3 lines" in out


def test_missing_root_is_a_one_line_error(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "nope")]) == 2
    message = f"arch_report: --root {tmp_path / 'nope'} is not a folder: give the root of a checkout\n"
    assert capsys.readouterr().err == message
