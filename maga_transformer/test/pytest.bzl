"""pytest_suite: one py_test per test file, all run through pytest by a shared runner.

Each test directory with a BUILD is its own Bazel package, so the suite also carries that
package's non-test files (conftest.py, __init__.py, helper modules, golden data) as data;
maga_transformer/test's own files (root conftest.py, fixtures.py) come via :test_support.
An empty glob (a directory whose tests are not written yet) gives an empty suite, not an error.
"""

load("@rules_python//python:defs.bzl", "py_test")

_RUNNER = "//maga_transformer/test:pytest_runner.py"

def pytest_suite(name, srcs, size = "large", timeout = None, tags = [], data = [], deps = []):
    support = native.glob(
        ["**/*"],
        exclude = ["**/test_*.py", "BUILD", "**/*.bzl", "**/__pycache__/**", "**/*.pyc"],
    )
    tests = []
    for src in srcs:
        test_name = src[:-3]
        py_test(
            name = test_name,
            srcs = [_RUNNER, src],
            main = _RUNNER,
            args = ["$(location %s)" % src],
            data = data + support + [src, "//maga_transformer/test:test_support"],
            deps = deps + ["//maga_transformer"],
            size = size,
            timeout = timeout,
            tags = tags,
        )
        tests.append(":" + test_name)
    native.test_suite(name = name, tests = tests, tags = tags)
