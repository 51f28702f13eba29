"""Maps the top-level data folders (templates/, search_spaces/, tuned_configs/) into the
wheel as vidrial/_data/<folder>, so an installed vidrial carries them. Everything else
is declared in pyproject.toml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_DIRS = ("templates", "search_spaces", "tuned_configs")
ROOT = Path(__file__).parent


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        for folder in DATA_DIRS:
            for src in sorted((ROOT / folder).rglob("*")):
                if src.is_file() and "__pycache__" not in src.parts:
                    dst = Path(self.build_lib) / "vidrial" / "_data" / src.relative_to(ROOT)
                    self.mkpath(str(dst.parent))
                    self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": BuildPyWithData})
