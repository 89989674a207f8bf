"""The documentation cannot drift from the code: the generated configuration reference, the paths, links and
config keys that README.md and docs/ mention, and the README command that CI runs."""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import typing

import pytest

import network
from scripts.dev import gen_config_docs as gen
from utils.config import ALIASES, Config, choices, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# docs/differences.md names removed keys on purpose (what replaced them); it is checked by its own owner.
PAGES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
    if f.endswith(".md") and f != "differences.md"
)
README_TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest -q'


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def schema_keys(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted leaf key of the schema with its type annotation (sub-sections flattened)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, typing.Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(schema_keys(hints[f.name], key + "."))
        else:
            out[key] = hints[f.name]
    return out


def test_configuration_md_is_generated_from_the_current_schema():
    current = read("docs/configuration.md")
    assert current == gen.render(), (
        "docs/configuration.md is out of date with utils/config.py: run python -m scripts.dev.gen_config_docs"
    )


def test_every_schema_key_has_a_row_with_its_type_default_and_description():
    text = gen.render()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    defaults = to_dict(Config())
    for key, hint in schema_keys().items():
        assert key in rows, f"{key} has no row in the generated reference"
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[key])[1:-1]]  # escaped pipes stay in a cell
        assert cells[1] == f"`{gen.type_name(hint)}`"
        value = defaults
        for part in key.split("."):
            value = value[part]
        assert cells[2] == (f"`{gen.yaml_value(value)}`" if gen.yaml_value(value) else "")
        assert cells[3], f"{key} has no description: add a comment next to it in utils/config.py"
        for choice in choices(key):
            assert f"`{choice}`" in cells[3]


def test_rows_carry_the_source_comments_and_section_comments():
    text = gen.render()
    row = next(line for line in text.splitlines() if line.startswith("| `data.resample` |"))
    # the trailing comment of that field in utils/config.py, with its '|' escaped for the table
    assert "pil: Pillow's resize values (antialiased), as the original \\| opencv: faster, aliased" in row
    row = next(line for line in text.splitlines() if line.startswith("| `data.class_uniform.share` |"))
    assert "all_classes: int(n * pct / K) class-centred samples per class" in row  # the block above the field
    assert "Procedurally generated Cityscapes-layout data" in text  # the comment above SyntheticConfig's first field
    assert "| `model.options` | `dict[str, Any]` | `{trunk: resnet10t, aspp_ch: 64, " in text


def test_model_options_table_lists_every_registered_model_with_its_factory_defaults():
    text = gen.render()
    for name in network.list_models():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        for option in network.model_options(name):
            assert f"`{option}" in row
    row = next(line for line in text.splitlines() if line.startswith("| `hmsa_ocrnet_hrnet_w48` |"))
    assert "`ocrnet.HRNet_Mscale` (trunk: hrnet_w48)" in row and "`attn_bn_stats: both`" in row


SOURCE = '''\
@dataclass(frozen=True)
class Section:
    # What the whole section is for.
    first: int = 1  # the first field
    second: str = "a # not a comment"

    # about third,
    # on two lines
    third: dict[str, int] = field(
        default_factory=dict  # inside the value
    )
    # a block followed by a blank line describes nothing

    fourth: bool = False
'''


def test_comment_parsing_rules():
    docs = gen.parse_schema_source(SOURCE)["Section"]
    assert docs.section_comment == ["What the whole section is for."]
    assert docs.fields["first"].above == [] and docs.fields["first"].inline == ["the first field"]
    assert docs.fields["second"].above == [] and docs.fields["second"].inline == []
    assert docs.fields["third"].above == ["about third,", "on two lines"]
    assert docs.fields["third"].inline == ["inside the value"]
    assert docs.fields["fourth"].above == [] and docs.fields["fourth"].inline == []


def test_yaml_values_and_cells():
    assert gen.yaml_value(True) == "true"
    assert gen.yaml_value("") == "''"
    assert gen.yaml_value((128, 128)) == "[128, 128]"
    assert gen.yaml_value(((0.5, 1.0), (1.0,))) == "[[0.5, 1.0], [1.0]]"
    assert gen.yaml_value(1e-4) == "0.0001"
    assert gen.cell("bn | syncbn") == "bn \\| syncbn"


def test_hand_written_descriptions_name_existing_keys():
    stale = sorted(set(gen.FALLBACK) - set(schema_keys()))
    assert not stale, f"scripts/dev/gen_config_docs.py FALLBACK describes keys the schema no longer has: {stale}"
    sections = {f.name for f in dataclasses.fields(Config)}
    assert set(gen.SECTIONS) <= sections, f"SECTIONS names {sorted(set(gen.SECTIONS) - sections)}"


def test_check_mode_exit_codes(tmp_path, capsys):
    path = str(tmp_path / "configuration.md")
    assert gen.main(["--check", "--path", path]) == 1  # missing
    assert "run python -m scripts.dev.gen_config_docs" in capsys.readouterr().err
    assert gen.main(["--path", path]) == 0
    with open(path, encoding="utf-8") as f:
        assert f.read() == gen.render()
    assert gen.main(["--check", "--path", path]) == 0
    with open(path, "a", encoding="utf-8") as f:
        f.write("hand edit\n")
    assert gen.main(["--check", "--path", path]) == 1
    assert "out of date" in capsys.readouterr().err


def test_readme_holds_the_test_command_that_ci_runs():
    assert README_TEST_COMMAND in read("README.md").splitlines()
    assert README_TEST_COMMAND in read(".ci/run").splitlines()
    assert 'pip install -e ".[test]" && python train.py' in read("README.md").splitlines()


def test_readme_is_short():
    assert len(read("README.md").splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES)
def test_pages_cite_no_internal_spec(page):
    assert "REFERENCE" not in read(page)


@pytest.mark.parametrize("page", PAGES)
def test_links_and_paths_exist(page):
    text = read(page)
    folder = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert os.path.exists(os.path.join(folder, target)), f"{page} links to a missing {target}"
    for path in set(re.findall(r"\b((?:configs|scripts|tests|utils|network|datasets|loss|transforms)/[\w/.-]*\w)",
                               text)):
        if path.endswith((".yaml", ".py", ".sh", ".sbatch")) or "." not in os.path.basename(path):
            assert os.path.exists(os.path.join(ROOT, path)), f"{page} names a missing {path}"
    for module in set(re.findall(r"python -m scripts\.([\w.]+\w)", text)):
        path = os.path.join(ROOT, "scripts", *module.split(".")) + ".py"
        assert os.path.isfile(path), f"{page} runs a missing scripts.{module}"


@pytest.mark.parametrize("page", PAGES)
def test_anchors_exist(page):
    text = read(page)
    folder = os.path.dirname(os.path.join(ROOT, page))
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = os.path.normpath(os.path.join(folder, target)) if target else os.path.join(ROOT, page)
        with open(linked, encoding="utf-8") as f:
            headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
        slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, f"{page}: no heading for #{anchor} in {target or page}"


KEY = re.compile(r"(?<![\w./'-])(data|model|loss|train|eval)\.([a-z_][a-z0-9_]*)(?:\.([a-z_][a-z0-9_]*))?")
FILES = {"py", "log", "sbatch", "onnx", "pth", "yaml", "json", "jsonl", "csv"}
CODE_NAMES = {"loss.build_criterion"}  # Python names that look like keys
PYTHON_NAME = re.compile(r"`((?:utils|network|datasets|loss|transforms)(?:\.[A-Za-z_]\w*)+)")


def resolves(name: str) -> bool:
    """Whether a dotted name is an importable module, or an attribute chain of one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES)
def test_config_keys_mentioned_exist(page):
    keys = schema_keys()
    sections = {k.rsplit(".", 1)[0] for k in keys}
    options = {o for name in network.list_models() for o in network.model_options(name)}
    for m in KEY.finditer(read(page)):
        head, name, sub = m.groups()
        if name in FILES or f"{head}.{name}" in CODE_NAMES:
            continue
        key = f"{head}.{name}"
        if key == "model.options" and sub:
            assert sub in options, f"{page} mentions model.options.{sub}, which no model accepts"
        elif f"{key}.{sub}" in keys or (sub and f"{key}.{sub}" in sections):
            continue
        else:
            old_name = page == "docs/configuration.md" and key in ALIASES  # its table of the old names
            assert key in keys or key in sections or old_name, f"{page} mentions {m.group(0)}, which is not a config key"


@pytest.mark.parametrize("page", PAGES)
def test_python_names_mentioned_exist(page):
    keys = schema_keys()
    for name in set(PYTHON_NAME.findall(read(page))):
        if name in keys or name.rsplit(".", 1)[0] in keys:
            continue  # a config key (loss.main, ...), checked above
        assert resolves(name), f"{page} names {name}, which does not import"
