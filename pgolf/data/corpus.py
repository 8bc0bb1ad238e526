"""Documents from a source: the builtin corpus (the Jargon File, shipped with pgolf) or local files.

Every reader yields document texts in a fixed order and streams: jsonl line by line, parquet
record batch by record batch, so memory stays constant in the corpus size.
"""
from __future__ import annotations

import gzip
import json
import lzma
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pgolf.errors import FormatError, InputError
from pgolf.typed_params import check_range

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
# The builtin corpus: fixed bytes shipped with pgolf (its README says what and under which licence).
# Text taken from the running interpreter (its docstrings, pydoc's topics) would change with
# Python's patch release, and every hash of dvc.lock with it.
BUILTIN = Path(__file__).resolve().parent / "builtin" / "jargon.jsonl.xz"


@dataclass
class CorpusConfig:
    # 'builtin'; a jsonl / jsonl.gz / parquet / txt file or folder; or hf://owner/dataset/path.jsonl, e.g.
    # the challenge's hf://willdepueoai/parameter-golf/datasets/docs_selected.jsonl. A .jsonl with a
    # .source_manifest.json beside it is checked against the manifest's docs_sha256 first.
    source: str = "builtin"
    text_field: str = "text"
    max_docs: int = 0  # 0: every document

    def validate(self) -> None:
        check_range(self, "max_docs", ge=0)


def builtin_documents() -> Iterator[str]:
    """The Jargon File 4.4.7 (public domain), one document per lexicon entry or section, in the
    file's order: 2,354 documents, 1.55 MB of English text."""
    with lzma.open(BUILTIN, "rb") as f:
        for line in f:
            yield json.loads(line)["text"]


def source_files(source: str | Path) -> list[Path]:
    path = Path(source)
    if not path.exists():
        raise InputError("corpus source not found (use 'builtin' or a jsonl/jsonl.gz/parquet/txt file or folder)", path)
    if path.is_dir():
        files = []
        for entry in sorted(path.rglob("*")):
            if entry.is_symlink() and entry.is_dir():
                raise InputError("a link to a folder inside the corpus folder, which is not followed (links can loop): "
                                 "give that folder as its own source, or copy it in", entry)
            if entry.name.endswith(SUFFIXES):
                files.append(_readable_file(entry))
        if not files:
            raise InputError(f"no {'/'.join(SUFFIXES)} files in this folder", path)
        return files
    if not path.name.endswith(SUFFIXES):
        raise InputError(f"unsupported corpus file type; expected one of {SUFFIXES}", path)
    return [path]


def _readable_file(path: Path) -> Path:
    """A corpus file is a regular file: a broken or looping link, or a folder or device under a
    corpus file's name, would otherwise be skipped without a word and change the documents."""
    try:
        path.resolve(strict=True)
    except RuntimeError as err:  # a symlink loop, on Pythons that raise it as such
        raise InputError("a link that loops back on itself, not a corpus file", path) from err
    except OSError as err:
        raise InputError(f"a link that leads nowhere or loops ({err.strerror}), not a corpus file", path) from err
    if not path.is_file():
        raise InputError("named like a corpus file but not a regular file", path)
    return path


def _decode(raw: bytes, path: Path, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"line {line}, " if line is not None else ""
        raise FormatError(f"{where}byte {err.start}: not valid UTF-8 text", path) from err


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FormatError(f"line {lineno}: invalid JSON ({err.msg})", path) from err
            if not isinstance(record, dict) or text_field not in record:
                raise FormatError(f"line {lineno}: no {text_field!r} field", path)
            text = record[text_field]
            if not isinstance(text, str):
                raise FormatError(f"line {lineno}: field {text_field!r} is not a string", path)
            yield _valid_unicode(text, path, f"line {lineno}")


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise FormatError(f"cannot read as parquet: {err}", path) from err
    if text_field not in reader.schema_arrow.names:
        raise FormatError(f"no {text_field!r} column (columns: {reader.schema_arrow.names})", path)
    row = 0
    for batch in reader.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            # A null row dropped would shift every later document, and with them the val split.
            if not isinstance(text, str):
                what = "null" if text is None else f"a {type(text).__name__}, not a string"
                raise FormatError(f"row {row}: column {text_field!r} is {what}; drop or fill such rows first", path)
            row += 1
            yield text


def _valid_unicode(text: str, path: Path, where: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which no UTF-8 file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FormatError(f"{where}: character {err.start} is a lone surrogate U+{ord(text[err.start]):04X} (an "
                          "unpaired \\ud800-\\udfff escape), which is not Unicode text", path) from err
    return text


def read_documents(source: str, text_field: str = "text") -> Iterator[str]:
    if source == "builtin":
        yield from builtin_documents()
        return
    for path in source_files(source):
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_documents(path, text_field)
        elif path.name.endswith(".parquet"):
            yield from _parquet_documents(path, text_field)
        else:
            yield _txt_document(path)


# What a text file may hold besides printable text: tab, line feed, form feed. NUL and the other C0
# and C1 controls mean a binary or mis-decoded file, which would otherwise go into the corpus as it is.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def _txt_document(path: Path) -> str:
    """One .txt file as one document. Line ends become LF, as Python's text mode reads them and as the
    challenge's jsonl documents hold them; a control character is an error naming file and line.
    jsonl and parquet documents are kept exactly as they are: those are the challenge's own format."""
    text = _decode(path.read_bytes(), path).replace("\r\n", "\n").replace("\r", "\n")
    bad = _CONTROL.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise FormatError(f"line {line}: control character U+{ord(bad.group()):04X}, which text does not hold: a "
                          "binary file? Remove the control characters, or give the document as jsonl (kept verbatim)",
                          path)
    return text
