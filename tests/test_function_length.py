"""Functions in mscl_stream/ stay short enough to read top to bottom: at most MAX_LINES lines each."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mscl_stream"
MAX_LINES = 80
# "path::function" -> why it may be longer for now (at most two, each with its reason)
EXCEPTIONS: dict[str, str] = {}


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function, nested ones included, longer than ``limit`` lines, counted from
    the ``def`` line to the function's last line (decorators left out)."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_the_count_starts_at_def_and_ends_at_the_last_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    source = f"@decorator\ndef fits():\n{body}\n\nasync def too_long():\n{body}    return x0\n"
    # fits: def + 79 body lines = 80; too_long: def + 79 + return = 81
    assert long_functions(source) == [("too_long", 81)]


def test_no_function_in_the_package_is_too_long():
    assert len(EXCEPTIONS) <= 2, "at most two named exceptions"
    too_long, seen = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for name, lines in long_functions(path.read_text(encoding="utf-8")):
            key = f"{rel}::{name}"
            seen.add(key)
            if key not in EXCEPTIONS:
                too_long.append(f"{rel}:{name}:{lines}")
    assert not too_long, f"functions longer than {MAX_LINES} lines (split them into named helpers): {too_long}"
    stale = sorted(set(EXCEPTIONS) - seen)
    assert not stale, f"exceptions no longer needed (remove them from EXCEPTIONS): {stale}"
