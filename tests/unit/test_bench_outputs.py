"""Benches never rewrite tracked files (issue 44): what a bench writes goes to bench/out/ (git-ignored),
a temporary folder or a path the user names; docs/img only with an explicit --update-docs."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def defaults_under_docs(path: Path) -> list[str]:
    """'file:line' of every argparse default or literal path in `path` that points into docs/."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("docs/"):
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
    return found


def test_no_bench_writes_into_docs_by_default():
    assert [f for p in sorted(BENCH.glob("*.py")) for f in defaults_under_docs(p)] == []


def test_the_bench_output_folder_is_ignored_and_the_update_is_explicit():
    assert "bench/out/" in (ROOT / ".gitignore").read_text().splitlines(), "bench/out/ must be git-ignored"
    source = (BENCH / "pp_bubble.py").read_text()
    assert 'str(ROOT / "bench" / "out")' in source and '"--update-docs"' in source
    assert 'ROOT / "docs" / "img"' in source.split("if args.update_docs:")[1].split("\n")[1]
    assert "OUT=${OUT:-bench/out/gpu_check}" in (BENCH / "gpu_check.sh").read_text()


def test_the_check_finds_a_docs_default(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import argparse\nap = argparse.ArgumentParser()\nap.add_argument("--img", default="docs/img")\n')
    assert defaults_under_docs(bad) == ["bad.py:3 'docs/img'"]
