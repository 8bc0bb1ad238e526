"""The challenge's published documents: `docs_selected.jsonl` with its sidecar
`docs_selected.source_manifest.json` (num_docs, docs_val, docs_sha256, shuffle_seed; docs/lineage.md#source-documents),
from a Hugging Face dataset repository or a local copy, verified before a document is read.

    corpus.source: hf://willdepueoai/parameter-golf/datasets/docs_selected.jsonl
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pgolf.errors import FormatError, InputError

HUB_PREFIX = "hf://"
MANIFEST_SUFFIX = ".source_manifest.json"


def manifest_path(docs: Path) -> Path:
    """docs_selected.jsonl -> docs_selected.source_manifest.json, beside it."""
    return docs.with_name(docs.name.removesuffix(".gz").removesuffix(".jsonl") + MANIFEST_SUFFIX)


def split_hub_source(source: str) -> tuple[str, str]:
    """hf://owner/name/path/in/repo -> ("owner/name", "path/in/repo")."""
    parts = source.removeprefix(HUB_PREFIX).split("/")
    if len(parts) < 3 or not all(parts):
        raise InputError(f"{source!r}: expected hf://<owner>/<dataset>/<path of the .jsonl in the repository>")
    return "/".join(parts[:2]), "/".join(parts[2:])


def download(source: str) -> Path:
    """The documents file of an hf:// source in the local Hugging Face cache, with its manifest beside
    it (downloaded once; later runs read the cache, also offline)."""
    from huggingface_hub import hf_hub_download

    repo, path = split_hub_source(source)
    files = {}
    for name in (path, str(manifest_path(Path(path)))):
        try:
            files[name] = Path(hf_hub_download(repo_id=repo, filename=name, repo_type="dataset"))
        except Exception as err:  # noqa: BLE001 - offline, missing file, HTTP errors: one message for all
            raise InputError(f"cannot get {name} from the Hugging Face dataset {repo} ({type(err).__name__}: {err}). "
                             "Offline? Download it on a connected machine and set corpus.source to the local "
                             f"file (keep its {MANIFEST_SUFFIX} beside it)") from err
    return files[path]


def verify(docs: Path) -> dict | None:
    """Check `docs` against its sidecar manifest when it has one; returns the manifest (None when
    there is no sidecar). A mismatch is an error naming both files: the documents are not the ones
    the manifest describes, so shards built from them would not be the challenge's."""
    sidecar = manifest_path(docs)
    if not sidecar.is_file():
        return None
    try:
        manifest = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot read the source manifest ({err})", sidecar) from err
    expected = manifest.get("docs_sha256")
    if not isinstance(expected, str):
        raise FormatError("the source manifest has no docs_sha256 to verify the documents against", sidecar)
    with open(docs, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        raise FormatError(f"sha256 {actual} does not match docs_sha256 {expected} in {sidecar.name}: the file is "
                          "incomplete or not the published one; download it again", docs)
    return manifest
