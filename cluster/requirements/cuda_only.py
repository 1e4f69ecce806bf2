"""`make lock`: keep, of a full `uv export` on stdin, only what the named export lacks (torch's CUDA libraries).

PyPI's Linux torch is the CUDA build and imports only with these; `make` installs them (hashed, --no-deps) where
the CPU build cannot be had. Usage: uv export ... | python cuda_only.py runtime.txt > torch-cuda.txt
"""

import re
import sys

HEADER = """# torch's CUDA libraries, hashed from uv.lock: what the unpruned export has and runtime.txt has not.
# `make` installs them only where PyPI's (CUDA) torch is the one installed. Written by `make lock`.
"""


def blocks(text: str) -> dict[str, str]:
    """Requirement name -> its lines (`name==version \\` and the indented hash lines after it)."""
    found: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        pinned = re.match(r"^([A-Za-z0-9][\w.-]*)==", line)
        if pinned:
            name = pinned.group(1)
            found[name] = [line]
        elif name and line.startswith(" "):
            found[name].append(line)
        else:
            name = None
    return {n: "\n".join(lines) + "\n" for n, lines in found.items()}


def main() -> None:
    with open(sys.argv[1]) as f:
        have = blocks(f.read())
    full = blocks(sys.stdin.read())
    sys.stdout.write(HEADER + "".join(block for name, block in full.items() if name not in have))


if __name__ == "__main__":
    main()
