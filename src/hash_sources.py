"""Prints the C header that names the hash of the runtime's sources (Bazel's genrule :source_hash).

The same hash as maga_transformer/ops/_compiled.py source_hash(): sha256 over each source's path
(relative to the repository root) and bytes, in path order, first 16 hex digits. The loader compares
it with the sources beside a bundled library and refuses a library built from others.
Usage: python3 src/hash_sources.py FILE... > source_hash.h
"""
import hashlib
import sys


def main(paths):
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    print(f'#define MAGA_SOURCE_HASH "{digest.hexdigest()[:16]}"')


if __name__ == "__main__":
    main([p for p in sys.argv[1:] if p.endswith((".h", ".cuh", ".cc", ".cu"))])
