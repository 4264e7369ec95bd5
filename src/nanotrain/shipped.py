"""What nano-train ships beside its code: the configs (configs/*.toml) and the tiny corpus
(data/tinyshakespeare.txt). In a checkout they are the repository's own files; in an installed
package (a wheel: setup.py copies them in as package data) they live in nanotrain/shipped/. Either
way a user names them as in the checkout: `--config shakespeare_char`, data.path
"data/tinyshakespeare.txt"."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent / "shipped"  # an installed wheel's copy
CHECKOUT = Path(__file__).resolve().parents[2]  # src/nanotrain/shipped.py -> the repository root


def shipped(rel: str | Path) -> Path | None:
    """The shipped file at `rel` (relative to the repository root, e.g. configs/x.toml), in the
    package or the checkout; None if nano-train ships no such file."""
    for root in (PACKAGE, CHECKOUT):
        path = root / rel
        if path.is_file() and (root is PACKAGE or (CHECKOUT / "pyproject.toml").is_file()):
            return path
    return None


def shipped_configs() -> list[str]:
    """The names `--config NAME` finds (configs/NAME.toml)."""
    names = set()
    for root in (PACKAGE, CHECKOUT):
        names |= {p.stem for p in (root / "configs").glob("*.toml")}
    return sorted(names)
