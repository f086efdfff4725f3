"""Check that every relative link in the repository's Markdown files resolves.

For each ``*.md`` file that git tracks (or would track), every inline link or image ``[text](target)``
outside code blocks whose target is not a URL is checked: the file must exist (relative to the
linking file), and an ``#anchor`` must match a heading of the target Markdown file, spelled as GitHub
spells heading anchors (lower case, punctuation dropped, spaces to ``-``, ``-1`` / ``-2`` for repeats).

    python docs/check_links.py            # from the repository root; exit 1 when a link is broken

Prints one line per broken link (``file:line: target: reason``) and a summary line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def markdown_files() -> List[Path]:
    """The ``*.md`` files git tracks or would track (untracked, not ignored), sorted."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted({ROOT / line for line in out.splitlines() if (ROOT / line).is_file()})


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """``(line number, line)`` of the lines outside fenced code blocks."""
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield no, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())  # \w keeps letters, digits and underscores
    return text.replace(" ", "-")


def anchors(path: Path, cache: Dict[Path, Set[str]]) -> Set[str]:
    """Every heading anchor of a Markdown file (repeated headings get ``-1``, ``-2``, ...)."""
    if path not in cache:
        seen: Dict[str, int] = {}
        found: Set[str] = set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            m = HEADING.match(line)
            if not m:
                continue
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        cache[path] = found
    return cache[path]


def broken_links(files: List[Path]) -> List[str]:
    """One ``file:line: target: reason`` line per link that does not resolve."""
    cache: Dict[Path, Set[str]] = {}
    problems = []
    for md in files:
        for no, line in prose_lines(md.read_text(encoding="utf-8")):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                    continue
                path_part, _, anchor = target.partition("#")
                dest = (md.parent / path_part).resolve() if path_part else md
                where = f"{md.relative_to(ROOT)}:{no}: {target}"
                if not dest.exists():
                    problems.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest, cache):
                    problems.append(f"{where}: no heading with this anchor in {dest.relative_to(ROOT)}")
    return problems


def main() -> int:
    files = markdown_files()
    problems = broken_links(files)
    for p in problems:
        print(p)
    print(f"check_links: {len(files)} Markdown files, {len(problems)} broken link(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
