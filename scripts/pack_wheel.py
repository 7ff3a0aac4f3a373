"""Bazel's wheel step (//maga_transformer:maga_transformer_whl): stages the package, the runtime
libraries Bazel built and the runtime's sources as a source tree, then runs the same
`pip wheel` (pyproject.toml + setup.py) that scripts/build_wheel.sh runs, so both give one wheel.
Usage: python3 scripts/pack_wheel.py OUT.whl FILE...   (FILE: workspace paths; *.so: libraries)
"""
import os
import shutil
import subprocess
import sys
import tempfile


def stage(files, root):
    for path in files:
        if path.endswith(".so"):  # a Bazel-built runtime library (bazel-out/.../src/lib*.so)
            target = os.path.join(root, "maga_transformer", "lib", os.path.basename(path))
        else:
            target = os.path.join(root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(path, target)


def main(out, files):
    with tempfile.TemporaryDirectory() as work:
        tree, dist = os.path.join(work, "tree"), os.path.join(work, "dist")
        stage(files, tree)
        env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist,
                        tree], check=True, env=env)
        built = os.listdir(dist)
        if built != [os.path.basename(out)]:
            sys.exit(f"pack_wheel: pip made {built}, the BUILD rule declares {os.path.basename(out)} "
                     "(keep the version in pyproject.toml and maga_transformer/BUILD in step)")
        shutil.copy(os.path.join(dist, built[0]), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
