"""How jargon.jsonl.xz was made (not run by the pipeline): the Jargon File 4.4.7, in the public
domain, split into documents.

    python pgolf/data/builtin/prepare.py jargon.txt pgolf/data/builtin/jargon.jsonl.xz

jargon.txt is the plain-text Jargon File 4.4.7 as Debian's jargon-text package (4.4.7-4.1) ships it
in /usr/share/doc/jargon-text/jargon.txt.gz (sha256 in README.md). One document per lexicon entry
(its headword line, then its text) and per section of the introduction and the appendices, in the
file's order; tables of contents and the glossary's headword lists are left out. Text is dedented
by the file's three-space margin; everything else is as the file has it.
"""
from __future__ import annotations

import json
import lzma
import re
import sys
from pathlib import Path

ENTRY = re.compile(r"^   :(.+?):\s*(.*)$")


def documents(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"Chapter\s1\.", line))
    docs: list[list[str]] = []
    for line in lines[start:]:
        entry = ENTRY.match(line)
        if entry:
            head = f"{entry.group(1)}: {entry.group(2)}".rstrip(": ").rstrip()
            docs.append([head, ""])
        elif line and not line[0].isspace() and not line[0] in "│├└┌":
            docs.append([line.strip(), ""])
        elif docs:
            docs[-1].append(line[3:] if line.startswith("   ") else line.lstrip())
    out = []
    for doc in docs:
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(doc)).strip()
        title, _, rest = body.partition("\n")
        if title in ("Glossary",) or rest.strip().startswith("Table of Contents") and _headword_list(rest):
            continue
        out.append(body)
    return out


def _headword_list(rest: str) -> bool:
    """A table of contents: short lines only."""
    lines = [line for line in rest.splitlines() if line.strip()]
    return all(len(line) < 60 for line in lines)


def main(argv: list[str]) -> int:
    source, target = Path(argv[0]), Path(argv[1])
    docs = documents(source.read_text(encoding="utf-8"))
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    target.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{len(docs)} documents, {len(data):,} bytes of jsonl, {target.stat().st_size:,} compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
