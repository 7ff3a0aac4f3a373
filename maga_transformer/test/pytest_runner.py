"""Runs one test file under pytest inside Bazel; 'no tests collected' is a failure, not a pass."""
import os
import sys

import pytest

NO_TESTS_COLLECTED = 5


def main() -> int:
    test_file = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    repo_root = os.path.dirname(os.path.dirname(here))
    sys.path.insert(0, repo_root)
    # extra arguments pass through: bazel test ... --test_arg=-k --test_arg=NAME (or --test_arg=-s)
    extra = sys.argv[2:]
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", repo_root, os.path.join(repo_root, test_file), *extra])
    if code == NO_TESTS_COLLECTED:
        print(f"{test_file}: no tests collected", file=sys.stderr)
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
