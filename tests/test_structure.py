"""The module reads top to bottom: each section uses only names defined in sections above it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import sysmail

SOURCE = Path(sysmail.__file__).read_text(encoding="utf-8")
BANNER = re.compile(r"# ---- (.+) ---- #$")


def banners(source: str = SOURCE) -> list[tuple[int, str]]:
    """(line number, title) of every section banner, in file order."""
    return [(number, match.group(1)) for number, line in enumerate(source.splitlines(), 1)
            if (match := BANNER.match(line))]


def section_of(line: int, sections: list[tuple[int, str]]) -> int:
    """The index of the section a line belongs to (-1 above the first banner)."""
    return max((i for i, (start, _) in enumerate(sections) if start <= line), default=-1)


def top_level_names(tree: ast.Module) -> dict[str, int]:
    """Each module-level name (function, class, constant) and the line defining it."""
    names: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.setdefault(node.name, node.lineno)
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    names.setdefault(name.id, node.lineno)
    return names


def forward_references(source: str = SOURCE) -> list[str]:
    """Every use of a module-level name above the section that defines it."""
    sections, tree = banners(source), ast.parse(source)
    defined = {name: section_of(line, sections) for name, line in top_level_names(tree).items()}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in defined:
            used_in = section_of(node.lineno, sections)
            if 0 <= used_in < defined[node.id]:
                found.append(f"line {node.lineno}: {sections[used_in][1]} uses {node.id}, "
                             f"defined in {sections[defined[node.id]][1]}")
    return found


def test_no_section_uses_a_name_defined_below_it() -> None:
    assert forward_references() == []


def test_the_checker_sees_a_forward_reference() -> None:
    """The walk is not vacuous: a name used above its section is reported."""
    source = ("# ---- A ---- #\ndef early():\n    return late()\n\n"
              "# ---- B ---- #\ndef late():\n    return 1\n")
    assert forward_references(source) == ["line 3: A uses late, defined in B"]


def test_the_docstring_contents_list_the_banners_in_order() -> None:
    contents = sysmail.__doc__.split("Contents")[1].split(":", 1)[1].split("\n\n")[0]
    listed = [" ".join(title.split()) for title in contents.split(",")]
    assert listed == [title for _, title in banners()]


def test_every_public_name_is_defined_and_exported_once() -> None:
    assert len(sysmail.__all__) == len(set(sysmail.__all__))
    assert all(hasattr(sysmail, name) for name in sysmail.__all__)


def test_the_readme_configuration_table_agrees_with_the_config_defaults() -> None:
    """Defaults live in Config's fields; --help, the docstring and the README show them."""
    readme = (Path(sysmail.__file__).parent / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \|", readme,
                                                         re.MULTILINE)}
    for variable, field_name, _ in sysmail.ENVIRONMENT:
        if variable == "CREDENTIALS_DIRECTORY":
            continue
        assert variable in rows, f"{variable} is missing from the README's table"
        if field_name:
            shown = sysmail.environment_help().split(variable, 1)[1].split("(default ")[1]
            assert shown.split(")")[0].split(":")[0] in rows[variable], variable


def test_help_lists_every_variable_with_its_default() -> None:
    text = sysmail.environment_help()
    assert "SMTP_TIMEOUT_SECONDS" in text and "(default 30)" in text
    assert all(variable in text for variable, _, _ in sysmail.ENVIRONMENT)
