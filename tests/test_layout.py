"""The floors of docs/architecture.md, checked on the imports as written: the adapter core imports
neither Lightning nor the shell, the shell imports no domain, data imports neither tasks nor the
CLI; and the house rule on module sizes."""

import ast
from pathlib import Path

import pytest

from tests.tiny import REPO


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved within its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1]).replace(
        "tasks", "lightning_moe.tasks", 1
    )
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
    return names


def files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("lightning_moe/adapters"), ids=lambda p: p.name)
def test_the_adapter_core_imports_neither_lightning_nor_the_shell(path):
    for name in imported_modules(path):
        assert not name.startswith(("lightning", "pytorch_lightning")) or name.startswith(
            "lightning_moe.adapters"
        ), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((REPO / "lightning_moe").glob("*.py")), ids=lambda p: p.name)
def test_the_shell_imports_no_domain(path):
    assert not any(name.startswith("lightning_moe.tasks") for name in imported_modules(path))


@pytest.mark.parametrize("path", files("data"), ids=lambda p: p.name)
def test_data_imports_neither_tasks_nor_the_cli(path):
    for name in imported_modules(path):
        assert not name.startswith(("lightning_moe.tasks", "lightning_moe.cli")), (
            f"{path.name} imports {name}"
        )


def test_modules_stay_small():
    too_long = {
        str(path.relative_to(REPO)): lines
        for folder, limit in (("tasks", 400), ("lightning_moe", 500), ("data", 500))
        for path in files(folder)
        if (lines := len(path.read_text().splitlines())) > limit
    }
    assert not too_long
