"""Processes as the tests see them, from /proc (no psutil on a fresh machine)."""
from __future__ import annotations

import os
from typing import List


def children(pid: int) -> List[int]:
    """Processes whose parent is pid (from /proc: no psutil on a fresh machine)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
