"""The wheel's build steps beyond pyproject.toml: the runtime libraries and their sources.

`maga_transformer/lib/*.so` (the bundled runtime libraries: run `bash scripts/build_native.sh
[--cuda]` first) go in as package data; `src/` is copied to `maga_transformer/_runtime_src/src/`, so
an installed package can check the libraries against their sources and rebuild them where they do
not fit (ops/_compiled.py). The libraries depend on neither torch nor Python: the wheel is tagged
py3-none-<platform>, one wheel for every Python 3 and torch on that platform.
    pip wheel --no-deps --no-build-isolation -w dist .      (scripts/build_wheel.sh does all of it)
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel

_SOURCE_FILES = (".cc", ".cu", ".cuh", ".h", ".py", ".txt")


class BuildPyWithRuntime(build_py):
    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "maga_transformer", "_runtime_src", "src")
        shutil.rmtree(target, ignore_errors=True)
        for directory, _, names in os.walk("src"):
            for name in names:
                if name.endswith(_SOURCE_FILES):
                    dst = os.path.join(target, os.path.relpath(directory, "src"))
                    os.makedirs(dst, exist_ok=True)
                    shutil.copy2(os.path.join(directory, name), dst)


class PlatformWheel(bdist_wheel):
    """Binaries inside, but no Python ABI: py3-none-<platform>."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(cmdclass={"build_py": BuildPyWithRuntime, "bdist_wheel": PlatformWheel})
