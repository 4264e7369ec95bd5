"""The code stays readable in the ways a learner notices first: no function longer than a screen."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "nanotrain"
MAX_LINES = 80  # a function a reader can hold at once (nanoGPT's longest is ~60)


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (n lines)' for every function or method under root longer than limit."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions(SRC) == []


def test_a_long_function_is_found(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path / "pkg") == [f"pkg/m.py:5 long ({MAX_LINES + 1} lines)"]
