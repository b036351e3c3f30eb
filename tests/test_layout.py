"""The package's dependency direction, as docs/design.md's table states it, read from the imports."""

import ast
from collections import defaultdict
from pathlib import Path

import alnet

SOURCE = Path(alnet.__file__).parent
# Each module or package of alnet → what it may import from alnet (docs/design.md, "Dependency direction").
ALLOWED = {
    "labels": set(), "device": set(), "models": set(), "memory": set(),
    "metrics": {"labels"},
    "data": {"labels"},
    "config": {"data", "device", "models"},
    "trust": {"labels", "metrics", "data", "models"},
    "schema": {"labels", "data", "trust"},
    "checkpoint": {"config", "data", "models", "schema", "trust"},
    "int8": {"data", "models", "trust"},
    "pipeline": {"checkpoint", "data", "device", "int8", "labels", "models", "trust"},
    "fitting": {"checkpoint", "config", "data", "device", "int8", "models", "pipeline", "schema", "trust"},
    "report": {"config", "labels", "metrics", "models", "schema", "trust"},
    "gan": {"data", "device", "labels", "pipeline", "schema"},
    "train": {"checkpoint", "config", "data", "device", "fitting", "gan", "int8", "labels", "memory", "metrics",
              "models", "pipeline", "report", "schema", "trust"},
    "infer": {"checkpoint", "data", "device", "int8", "labels", "models", "pipeline", "schema", "trust"},
}


def _imports() -> dict[str, set[str]]:
    """Per top-level module or package of alnet, the other ones its files import (lazy imports included)."""
    found = defaultdict(set)
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                folder = list(parts[:-1])[:len(parts) - node.level]
                target = [*folder, *(node.module or "").split(".")]
                target = [p for p in target if p] or [node.names[0].name]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alnet."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target[0] != parts[0]:
                found[parts[0]].add(target[0])
    return found


def test_every_package_imports_only_what_the_design_document_allows():
    imports = _imports()
    assert set(imports) - {"cli", "__main__"} <= set(ALLOWED)
    for package, allowed in ALLOWED.items():
        assert imports.get(package, set()) <= allowed, (package, imports[package] - allowed)
    assert "pipeline" in imports["infer"] and "pipeline" in imports["train"]  # the reading sees real imports


def test_the_design_document_shows_every_csv_schema_as_the_code_defines_it():
    from alnet import schema

    design = (SOURCE.parents[1] / "docs" / "design.md").read_text()
    for columns in (schema.PREDICTIONS, schema.SUBJECTS, schema.REFUSED, schema.HISTORY, schema.GAN_HISTORY,
                    schema.GENERATED):
        assert schema.markdown_table(columns) in design, columns[0].name
