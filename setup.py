"""pyproject.toml holds the package's metadata; this only adds the files nano-train ships beside its
code (the configs, the tiny corpus: nanotrain/shipped.py) to a built package, copied from the
repository root into nanotrain/shipped/, so that an installed `nanotrain` finds them."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("configs", "data/tinyshakespeare.txt")  # what nanotrain/shipped.py finds there


class BuildWithShipped(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "nanotrain" / "shipped"
        for rel in SHIPPED:
            src, dst = ROOT / rel, target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.nanotrain"))
            else:
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildWithShipped})
