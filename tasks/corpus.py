"""Stage corpus: materialize documents from a source into data/corpus/docs.jsonl."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from pgolf.data.corpus import CorpusConfig as Config, read_documents
from pgolf.data.docs import DOCS_NAME, encode_doc
from pgolf.data.hub import HUB_PREFIX, download, verify
from pgolf.errors import InputError
from pgolf.json_files import write_json
from runner.stage import StageSpec, stage_main


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    source = str(download(cfg.source)) if cfg.source.startswith(HUB_PREFIX) else cfg.source
    manifest = verify(Path(source)) if source.endswith((".jsonl", ".jsonl.gz")) else None
    digest = hashlib.sha256()
    num_docs = text_bytes = 0
    with open(out / DOCS_NAME, "wb") as f:
        # Every document is kept, empty and whitespace-only ones too (a lone BOS in the shards), as the
        # challenge's export keeps every line: the val split is then the first N documents, the same
        # documents as the challenge's (docs/lineage.md#shards).
        for text in read_documents(source, cfg.text_field):
            line = encode_doc(text)
            f.write(line)
            digest.update(line)
            num_docs += 1
            text_bytes += len(text.encode("utf-8"))
            if cfg.max_docs and num_docs >= cfg.max_docs:
                break
    if num_docs == 0:
        raise InputError("the corpus has no documents", cfg.source)
    meta = {"source": cfg.source, "num_docs": num_docs, "text_bytes": text_bytes, "sha256": digest.hexdigest(),
            "source_manifest": manifest}
    write_json(out / "meta.json", meta)
    return {"num_docs": num_docs, "text_bytes": text_bytes}


SPEC = StageSpec(name="corpus", config_cls=Config, run=run, out="data/corpus")

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
