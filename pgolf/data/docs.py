"""The corpus stage's folder format: docs.jsonl, one {"text": ...} per line, in a fixed order."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pgolf.errors import InputError

DOCS_NAME = "docs.jsonl"


def encode_doc(text: str) -> bytes:
    return (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")


def iter_docs(folder: str | Path) -> Iterator[str]:
    path = Path(folder) / DOCS_NAME
    if not path.is_file():
        raise InputError(f"{DOCS_NAME} not found: is this a corpus stage output?", path)
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
