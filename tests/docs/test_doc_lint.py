"""The docs keep the shape the doc test and a learner rely on: commands in tagged blocks (so that
test_doc_commands.py runs them), measured tables that say when and on what they were measured,
lessons with their five parts and code references that still resolve."""

import ast
import re
from pathlib import Path

import pytest
from doc_blocks import FENCE, closing_fence, line_matches, missing_output, parse_doc, parse_marker

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "learn").glob("*.md"))]
LESSONS = sorted((ROOT / "docs" / "learn").glob("[0-9][0-9]_*.md"))
COMMAND = re.compile(r"^(\$ |nanotrain |python |\.venv/|make |torchrun |pip |source |[A-Z_]+=\S* )")
# A table of figures measured on a machine: its header names a time, a rate or a speed ratio.
MEASURED = re.compile(r"tok(en)?s/s|MB/s\b|GB/s\b|\bms\b|ms/step|s/step|\bseconds\b|\bratio\b|speed-?up", re.I)
DATE = re.compile(r"20\d\d-\d\d-\d\d")
SOURCE = re.compile(r"et al\. (19|20)\d\d|published|README's")  # a published figure: its source dates it
KIND = re.compile(r"Xeon|EPYC|AMX|AVX|Ryzen|Apple M\d|ARM|Graviton|[ABH]\d{3}|B200|MI300|GPU", re.I)
CODE_REF = re.compile(r"`(src/nanotrain/[\w/]+\.py):([\w.]+)`")


def fences(path: Path):
    """(line number, tag, first line of the body) of every fenced block."""
    lines, i = path.read_text().split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            end = closing_fence(lines, i, path)
            yield i + 1, m.group(1), lines[i + 1] if i + 1 < end else ""
            i = end
        i += 1


def untagged_commands(path: Path, root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{n}: {first[:60]}" for n, tag, first in fences(path)
            if tag == "" and COMMAND.match(first)]


def tables(path: Path):
    """(first line number, the table's lines, the 12 lines above it) of every Markdown table outside code."""
    lines, in_code, i = path.read_text().split("\n"), False, 0
    while i < len(lines):
        if lines[i].startswith("```"):
            in_code = not in_code
        elif not in_code and lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            yield i + 1, lines[i:end], lines[max(0, i - 12):i]
            i = end
            continue
        i += 1


def undated_tables(path: Path, root: Path = ROOT) -> list[tuple[str, int, str, str]]:
    """(page, line, header, what is missing) of each table of measured figures (by its header) with
    no date (or published source) or no machine kind in it or in the 12 lines above it."""
    found = []
    for n, table, above in tables(path):
        if not MEASURED.search(table[0]):
            continue
        context = "\n".join(above + table)
        missing = [what for what, rx in (("a date", DATE), ("a CPU/GPU kind", KIND)) if not rx.search(context)]
        if "a date" in missing and SOURCE.search(context):
            missing.remove("a date")
        if missing:
            found.append((str(path.relative_to(root)), n, table[0], " and ".join(missing)))
    return found


def undated_measurements(path: Path, root: Path = ROOT) -> list[str]:
    return [f"{page}:{n} lacks {what}" for page, n, header, what in undated_tables(path, root)
            if (page, header) not in KNOWN_UNDATED]


# Tables measured before this check existed whose date or machine is not on the page yet: none left
# (issue 44 dated the last ones from the commits that wrote their rows). An entry leaves when its
# table is dated (test_known_undated_tables_are_still_undated fails until it does); none may join.
KNOWN_UNDATED: set[tuple[str, str]] = set()  # every measured table is dated now


def test_every_command_block_is_tagged_so_that_the_doc_test_runs_it():
    found = [f for p in PAGES for f in untagged_commands(p)]
    assert not found, "tag these blocks ```bash (or ```console with `$ ` lines and their output): " + "; ".join(found)


def test_a_measured_table_says_when_and_on_what():
    found = [f for p in PAGES for f in undated_measurements(p)]
    assert not found, "add the date (YYYY-MM-DD) and the CPU or GPU kind next to: " + "; ".join(found)


def test_known_undated_tables_are_still_undated():
    """An entry of KNOWN_UNDATED whose table got its date (or changed header) must leave the set."""
    undated = {(page, header) for p in PAGES for page, _, header, _ in undated_tables(p)}
    assert KNOWN_UNDATED <= undated, f"dated or gone, remove from KNOWN_UNDATED: {sorted(KNOWN_UNDATED - undated)}"


def test_the_lints_catch_what_they_are_for(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Timed:\n\n| run | tokens/s |\n| --- | ---: |\n| a | 100 |\n\n```\nnanotrain train\n```\n")
    assert undated_measurements(page, tmp_path) == ["page.md:3 lacks a date and a CPU/GPU kind"]
    assert untagged_commands(page, tmp_path) == ["page.md:7: nanotrain train"]
    page.write_text("On 2 cores of an AMX Xeon, 2026-12-06:\n\n| run | tokens/s |\n| --- | ---: |\n| a | 100 |\n"
                    "\n| layout | GB |\n| --- | ---: |\n| tp=2 | 3.1 |\n\n```bash\nnanotrain train\n```\n")
    assert undated_measurements(page, tmp_path) == []
    assert untagged_commands(page, tmp_path) == []


def test_a_changed_output_line_is_caught():
    printed = "noise\nstep 1 loss 4.2104473 diff 9.79e-08\ntolerance 1e-05: PASS\n"
    assert missing_output(["step 1 loss 4.2104473 diff 9.79e-08", "...", "tolerance 1e-05: PASS"], printed, {}) == []
    assert missing_output(["tolerance 1e-05: FAIL"], printed, {}) == ["tolerance 1e-05: FAIL"]
    assert missing_output(["step 1 loss 4.2104 diff 1.2e-07"], printed, {}) == ["step 1 loss 4.2104 diff 1.2e-07"]
    assert missing_output(["step 1 loss 4.2104 diff 1.2e-07"], printed, {"tol": "1e-4 5e-6"}) == []
    # the words must match exactly whatever the tolerance; order matters
    assert not line_matches("step 1 loss 4.21", "step 1 lost 4.21", 1.0, 1.0)
    assert line_matches("largest difference: 2.7e-07 relative (...)", "largest difference: 2.9e-07 relative (w1; x)",
                        0, 1e-6)
    assert not line_matches("largest difference: 2.7e-07 relative (...)", "largest difference: 2.9e-07 absolute (w)",
                            0, 1e-6)
    assert line_matches("a   1,003,854 tokens", "a 1,003,854 tokens", 0, 0)
    assert missing_output(["tolerance 1e-05: PASS", "step 1 loss 4.2104473 diff 9.79e-08"], printed, {}) == \
        ["step 1 loss 4.2104473 diff 9.79e-08"]


def test_markers_parse():
    assert parse_marker(" fast; expect: a; b; expect: c") == {"fast": True, "expect": ["a; b", "c"]}
    assert parse_marker("\nrun: x=1; y\nrun: z\ntol: 1e-3\n") == {"run": ["x=1; y", "z"], "tol": "1e-3"}
    with pytest.raises(ValueError, match="unknown key 'expekt'"):
        parse_marker("expekt: a")


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_a_lesson_has_its_five_parts(lesson):
    text = lesson.read_text()
    for part in ("**The idea.**", "## Run it", "## The code", "## Verify", "## Try"):
        assert part in text, f"{lesson.name} has no {part!r}"
    tags = [tag for _, tag, _ in fences(lesson)]
    assert "text" in tags, f"{lesson.name}: the idea's picture goes in a ```text block"
    blocks = parse_doc(lesson, ROOT)
    verify = text.split("## Verify")[1].split("## Try")[0]
    assert any(b.script.strip() in verify for b in blocks), f"{lesson.name}: its Verify has no command the test runs"
    assert lesson.name in (ROOT / "docs" / "learn" / "README.md").read_text(), f"docs/learn/README.md does not list {lesson.name}"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_a_lessons_code_references_resolve(lesson):
    """`src/nanotrain/x.py:Class.method` names a function or class that exists there."""
    refs = CODE_REF.findall(lesson.read_text())
    assert refs, f"{lesson.name} names no code as `src/nanotrain/FILE.py:NAME`"
    for path, name in refs:
        assert (ROOT / path).exists(), f"{lesson.name}: {path} does not exist"
        scope = ast.parse((ROOT / path).read_text()).body
        for part in name.split("."):
            node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
            assert node is not None, f"{lesson.name}: {path} has no {name}"
            scope = node.body


def test_the_readme_points_to_the_path_first():
    head = (ROOT / "README.md").read_text().split("## ")[0]
    assert "docs/learn/" in head.split("```")[0], "the README's first lines should point to docs/learn/"
