"""The house's rules, held against the code: each module of fleet imports only what its own (or its
package's) docstring allows under "May import:", and those rules point one way.

A rule lists module prefixes (`fleet.wire`, `fleet.run.process`); `fleet` alone allows every part,
"nothing of fleet" none. A module may always import within the package whose docstring holds its
rule. The rule of a module is its own docstring's, else its nearest package's. Imports inside
functions and under TYPE_CHECKING count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fleet"
RULE = re.compile(r"May import:(.*?)(?:\.\s|\.$|;)", re.S)
NAME = re.compile(r"\bfleet(?:\.[a-z_]+)*")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "static" not in p.parts)


@cache
def rule_of(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """(the module or package the rule belongs to, the prefixes it allows), from the docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    found = RULE.search(doc)
    if found is None:
        return None
    text = found.group(1)
    allowed = () if "nothing of fleet" in text else tuple(NAME.findall(text))
    return module_name(path), allowed


def governing_rule(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """A module's own rule, else the nearest package's (its __init__.py, then upward)."""
    if (own := rule_of(path)) is not None:
        return own
    folder = path.parent
    while folder != ROOT:
        init = folder / "__init__.py"
        if init.is_file() and (found := rule_of(init)) is not None:
            return found
        folder = folder.parent
    return None


def fleet_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a fleet module, wherever it is in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fleet"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "fleet":  # `from fleet import x`: a submodule, or the package's face
                out += [(node.lineno, f"fleet.{a.name}") for a in node.names
                        if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()]
            elif node.module.split(".")[0] == "fleet":
                out.append((node.lineno, node.module))
    return out


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_module_of_fleet_is_under_a_rule() -> None:
    unruled = [str(p.relative_to(ROOT)) for p in modules() if governing_rule(p) is None]
    assert unruled == [], f"no 'May import:' in these modules or their packages: {unruled}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_what_its_rule_allows(path: Path) -> None:
    rule = governing_rule(path)
    assert rule is not None
    home, allowed = rule
    me = module_name(path)
    broken = [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in fleet_imports(path)
              if not within(name, me) and not (home != me and within(name, home))
              and not any(within(name, prefix) for prefix in allowed)]
    assert broken == [], f"not allowed by the rule of {home} (May import: {', '.join(allowed) or 'nothing of fleet'}):\n" + "\n".join(broken)


def test_the_gateway_side_never_imports_the_engine_or_the_cluster() -> None:
    """Nothing but the top (cli) reaches the cluster, and nothing at all the engine package."""
    for path in modules():
        me = module_name(path)
        for line, name in fleet_imports(path):
            if within(name, "fleet.engine"):
                assert within(me, "fleet.engine"), f"{me}:{line} imports {name}"
            if within(name, "fleet.cluster"):
                assert within(me, "fleet.cluster") or me == "fleet.cli", f"{me}:{line} imports {name}"


def test_the_rules_point_one_way_no_package_allows_one_that_allows_it_back() -> None:
    rules = {home: allowed for p in modules() if (r := rule_of(p)) is not None for home, allowed in [r]}
    loops = [(a, b) for a, allowed in rules.items() for b in rules if a != b and a != "fleet" and b != "fleet"
             and any(within(b, x) for x in allowed) and any(within(a, y) for y in rules[b])
             and not within(a, b) and not within(b, a)]
    assert loops == [], f"these rules allow imports both ways: {loops}"
