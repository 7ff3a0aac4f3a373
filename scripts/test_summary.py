"""Adds up pytest's counts from the Bazel test logs and prints one closing line.

Bazel reports test targets; the per-test counts live in each target's pytest log. Only the targets
that exist now are read: a reused output base still holds logs of deleted targets.
"""
import os
import re
import subprocess
import sys

COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?)\b")


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else "bazel-testlogs"
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    labels = subprocess.check_output(["bazel", "query", "tests(//maga_transformer/...)"], text=True).split()
    logs = [os.path.join(root, *label.lstrip("/").replace(":", "/").split("/"), "test.log") for label in labels]
    for path in logs:
        if not os.path.exists(path):
            print(f"missing test log: {path}", file=sys.stderr)
            totals["error"] += 1
            continue
        with open(path, errors="replace") as f:
            lines = [line for line in f if COUNT.search(line) and " in " in line]
        if lines:  # pytest's final summary line of that target
            for number, kind in COUNT.findall(lines[-1]):
                totals["error" if kind.startswith("error") else kind] += int(number)
    failed = totals["failed"] + totals["error"]
    print(f"{totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 1 if failed or not totals["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
