"""Documents from a source: the builtin corpus (text shipped with Python) or local files.

Every reader yields document texts in a fixed order and streams: jsonl line by line, parquet
record batch by record batch, so memory stays constant in the corpus size.
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import io
import json
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from pgolf.errors import FormatError, InputError

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
# Standard-library modules that do something when imported (open windows, print, start servers)
# or that are platform-specific noise.
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "__phello__",
    "_pyrepl", "ensurepip", "venv", "lib2to3", "pydoc_data", "test", "xxlimited", "xxsubtype",
}
MIN_DOC_CHARS = 200


def builtin_documents() -> Iterator[str]:
    """Deterministic English text from the running Python: pydoc's topic help, then the docstrings
    of standard-library modules, one document per module docstring and per public class (with its
    methods) or function. Same Python version, same documents in the same order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    texts = (topics[key].strip() for key in sorted(topics))
    for text in _chain(texts, (t for name in _stdlib_module_names() for t in _module_texts(name))):
        if len(text) >= MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            yield text


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def _stdlib_module_names() -> list[str]:
    names = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        names.add(name)
        module = _import_quietly(name)
        if module is not None and hasattr(module, "__path__"):
            for info in pkgutil.iter_modules(module.__path__, prefix=f"{name}."):
                leaf = info.name.rsplit(".", 1)[-1]
                if not leaf.startswith("_") and "test" not in leaf:
                    names.add(info.name)
    return sorted(names)


def _import_quietly(name: str):
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a module that cannot import here simply contributes nothing
        return None


def _module_texts(name: str) -> Iterator[str]:
    module = _import_quietly(name)
    if module is None:
        return
    doc = inspect.getdoc(module)
    if doc:
        yield f"{name}\n\n{doc}"
    for attr in sorted(a for a in (getattr(module, "__all__", None) or dir(module)) if isinstance(a, str)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != name:
            continue
        parts = [f"{name}.{attr}", inspect.getdoc(obj) or ""]
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                meth_doc = inspect.getdoc(meth) if inspect.isfunction(meth) and not meth_name.startswith("_") else None
                if meth_doc:
                    parts.append(f"{meth_name}: {meth_doc}")
        yield "\n\n".join(p for p in parts if p).strip()


class _quiet:
    """Some modules print on import; keep that out of the stage's output."""

    def __enter__(self):
        self._stdout, self._stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self._stdout, self._stderr
        return False


def source_files(source: str | Path) -> list[Path]:
    path = Path(source)
    if not path.exists():
        raise InputError("corpus source not found (use 'builtin' or a jsonl/jsonl.gz/parquet/txt file or folder)", path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise InputError(f"no {'/'.join(SUFFIXES)} files in this folder", path)
        return files
    if not path.name.endswith(SUFFIXES):
        raise InputError(f"unsupported corpus file type; expected one of {SUFFIXES}", path)
    return [path]


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
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise FormatError(f"cannot read as parquet: {err}", path) from err
    if text_field not in reader.schema_arrow.names:
        raise FormatError(f"no {text_field!r} column (columns: {reader.schema_arrow.names})", path)
    for batch in reader.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


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
