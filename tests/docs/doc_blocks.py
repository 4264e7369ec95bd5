"""The commands a page of the docs shows, read as a test runs them (test_doc_commands.py).

A fenced block tagged `bash` holds commands; one tagged `console` holds `$ command` lines, each
followed by the output the page says it prints. An HTML comment just above a block tells the test
what the page cannot say in the block itself, one `key: value` a line (or `;`-separated on one line):

    <!-- test: fast; expect: tolerance 1e-05: PASS -->

    fast            run it in `make test` too (cheap: seconds); the rest run in `make test-docs`
    skip: REASON    do not run it (a GPU, a cluster, hours); the reason is shown
    run: CMD        the shorter form the test runs instead of the block (repeatable)
    before: CMD     run first, e.g. to make the file the page assumes you have (repeatable)
    expect: TEXT    the output must contain TEXT (repeatable)
    error: TEXT     the command must fail and print TEXT (an intentional error)
    tol: REL [ABS]  numbers in a console block's output may differ by REL relative (or ABS
                    absolute, whichever is larger): for measured figures; the default is exact
    timeout: S      seconds before the run counts as failed, a guard against a hang (default 600)
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"<!--\s*test\b:?(.*?)-->", re.S)
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
REPEATED = ("run", "before", "expect")
KEYS = ("fast", "skip", "run", "before", "expect", "error", "tol", "timeout")
NEXT_KEY = re.compile(r";\s*(?=(?:%s)\b)" % "|".join(KEYS))


@dataclass
class Block:
    doc: str                # path relative to the checkout, e.g. "docs/learn/01_one_process.md"
    line: int               # 1-based line of the opening fence
    lang: str               # "bash" or "console"
    script: str             # the commands, as bash runs them
    output: list[str] = field(default_factory=list)   # console: the lines the page says are printed
    marker: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"

    def commands(self) -> str:
        """What the test runs: the marker's shorter form if it gives one, else the block."""
        runs = self.marker.get("run") or [self.script]
        return "\n".join(self.marker.get("before", []) + runs)


def parse_marker(text: str) -> dict:
    """`key: value` pairs (newline- or `;`-separated) of one `<!-- test ... -->` comment."""
    found = {key: [] for key in REPEATED}
    for part in (p for line in text.split("\n") for p in NEXT_KEY.split(line)):
        key, _, value = part.strip().partition(":")
        key, value = key.strip(), value.strip()
        if not key:
            continue
        if key not in KEYS:
            raise ValueError(f"unknown key {key!r} in a test marker: use one of {', '.join(KEYS)}")
        if key in REPEATED:
            found[key].append(value)
        else:
            found[key] = value if _ else True
    return {k: v for k, v in found.items() if v != []}


def console_parts(lines: list[str]) -> tuple[str, list[str]]:
    """A console block's commands (`$ ` lines and their `\\` continuations) and expected output."""
    commands, output, continued = [], [], False
    for line in lines:
        if line.startswith("$ ") or continued:
            commands.append(line[2:] if line.startswith("$ ") else line)
            continued = line.endswith("\\")
        else:
            output.append(line)
    return "\n".join(commands), output


def parse_doc(path: Path, root: Path) -> list[Block]:
    """Every bash and console block of one Markdown file, with the marker just above it."""
    lines, blocks, i = path.read_text().split("\n"), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = closing_fence(lines, i, path)
        if m.group(1) in ("bash", "console"):
            body = lines[i + 1:end]
            script, output = console_parts(body) if m.group(1) == "console" else ("\n".join(body), [])
            blocks.append(Block(str(path.relative_to(root)), i + 1, m.group(1), script, output,
                                marker_above(lines, i)))
        i = end + 1
    return blocks


def closing_fence(lines: list[str], opening: int, path: Path) -> int:
    """The line index of the fence that closes the one at `opening`; ValueError if none does."""
    end = next((j for j in range(opening + 1, len(lines)) if lines[j].startswith("```")), None)
    if end is None:
        raise ValueError(f"{path}:{opening + 1}: a ``` block is never closed")
    return end


def marker_above(lines: list[str], fence: int) -> dict:
    """The `<!-- test ... -->` comment that ends on the line above `fence` (blank lines between)."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return {}
    start = j
    while start > 0 and "<!--" not in lines[start]:
        start -= 1
    m = MARKER.search("\n".join(lines[start:j + 1]))
    return parse_marker(m.group(1)) if m else {}


def tolerance(marker: dict) -> tuple[float, float]:
    """(relative, absolute) tolerance of a block's numbers: `tol: REL [ABS]`, exact without one."""
    parts = str(marker.get("tol", "0")).split()
    return float(parts[0]), float(parts[1]) if len(parts) > 1 else 0.0


def line_pattern(expected: str) -> re.Pattern:
    """A regex for one expected line: each number a group, `...` any text, any run of spaces any."""
    out, at = [], 0
    for m in re.finditer(NUMBER.pattern + r"|\.\.\.|…|\s+", expected.strip()):
        out.append(re.escape(expected.strip()[at:m.start()]))
        token = m.group(0)
        out.append(r".*?" if token in ("...", "…") else r"\s+" if token.isspace() else f"({NUMBER.pattern})")
        at = m.end()
    out.append(re.escape(expected.strip()[at:]))
    return re.compile("".join(out))


def line_matches(expected: str, actual: str, rel: float, absolute: float) -> bool:
    """The same words (`...` stands for any), and each number within tolerance of the page's."""
    m = line_pattern(expected).fullmatch(actual.strip())
    if m is None:
        return False
    for e, a in zip(NUMBER.findall(expected.replace("...", " ").replace("…", " ")), m.groups()):
        x, y = float(e.replace(",", "")), float(a.replace(",", ""))
        if abs(x - y) > max(absolute, rel * abs(x)):
            return False
    return True


def missing_output(expected: list[str], printed: str, marker: dict) -> list[str]:
    """The page's output lines that the run did not print, in order (other lines may come
    between them: a warning, a progress line); a `...` line stands for lines left out, a `...`
    inside a line for any text there."""
    rel, absolute = tolerance(marker)
    actual = [line.rstrip() for line in printed.split("\n")]
    missing, at = [], 0
    for line in (e.rstrip() for e in expected):
        if not line or line.strip() in ("...", "…"):
            continue
        hit = next((k for k in range(at, len(actual)) if line_matches(line, actual[k], rel, absolute)), None)
        if hit is None:
            missing.append(line)
        else:
            at = hit + 1
    return missing
