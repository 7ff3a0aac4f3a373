"""pytest_suite: one py_test per test file, all run through pytest by a shared runner."""

load("@rules_python//python:defs.bzl", "py_test")

def pytest_suite(name, srcs, size = "large", tags = [], data = []):
    tests = []
    for src in srcs:
        test_name = src[:-3]
        py_test(
            name = test_name,
            srcs = ["//maga_transformer/test:pytest_runner.py", src],
            main = "//maga_transformer/test:pytest_runner.py",
            args = ["$(location %s)" % src],
            data = data + [src, "//maga_transformer/test:test_support"] + native.glob(["__init__.py", "conftest.py"]),
            deps = ["//maga_transformer"],
            size = size,
            tags = tags,
        )
        tests.append(":" + test_name)
    native.test_suite(name = name, tests = tests, tags = tags)
