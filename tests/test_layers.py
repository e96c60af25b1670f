"""Package layering, read from the source with `ast` (nothing is imported): the video stages
(vfx/stages) and DreamBooth (vfx/dreambooth) are siblings. What both need lives below them
(vfx.diffusion, vfx.models, vfx.stage, ...), so neither imports the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "vfx"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = REPO) -> list[tuple[int, str, set[str]]]:
    """(line, statement, absolute modules it may load) for every import in the file, function-level
    ones included. `from A import B` may load A and A.B (B can be a submodule); relative imports
    are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, ast.unparse(node), {alias.name}) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            modules = {module} | {f"{module}.{alias.name}" for alias in node.names if alias.name != "*"}
            found.append((node.lineno, ast.unparse(node), modules))
    return sorted(found)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def crossings(source: Path, forbidden: str, root: Path = REPO) -> list[str]:
    """`file:line: statement` for every import under `source` that may load `forbidden` (or below it)."""
    return [f"{path.relative_to(root)}:{line}: {statement}"
            for path in sorted(source.rglob("*.py"))
            for line, statement, modules in imports(path, root)
            if any(within(module, forbidden) for module in modules)]


def test_the_import_walker_sees_every_form(tmp_path):
    """Control: plain, from-, package-attribute, relative and function-level imports are all found."""
    package = tmp_path / "vfx" / "stages"
    package.mkdir(parents=True)
    (package / "probe.py").write_text(
        "import vfx.dreambooth.train\n"
        "from vfx.dreambooth import data\n"
        "from vfx import dreambooth\n"
        "from ..dreambooth.weights import apply_lora\n"
        "def f():\n"
        "    from vfx.dreambooth.images import generate\n"
        "from vfx.diffusion import lora\n"
        "from . import common\n"
        "import vfx.dreambooth_like\n"
    )
    found = crossings(package, "vfx.dreambooth", tmp_path)
    assert [entry.split(":")[1] for entry in found] == ["1", "2", "3", "4", "6"], found
    assert found[3].endswith("from ..dreambooth.weights import apply_lora")


@pytest.mark.parametrize("source, forbidden", [("stages", "dreambooth"), ("dreambooth", "stages")])
def test_stages_and_dreambooth_do_not_import_each_other(source, forbidden):
    assert (PACKAGE / source).is_dir() and (PACKAGE / forbidden).is_dir()
    bad = crossings(PACKAGE / source, f"vfx.{forbidden}")
    assert not bad, f"vfx.{source} must not import vfx.{forbidden}:\n" + "\n".join(bad)
