"""The shards stage's settings (params.yaml's `shards` section), importable without torch, so a whole
params file is checked before any stage loads. Not in pgolf/data/shards.py: the eval code imports
that module, and every byte of it is charged to the artifact."""
from __future__ import annotations

from dataclasses import dataclass

from pgolf.data.shards import MAX_TOKENS
from pgolf.typed_params import check_range


@dataclass
class ShardsConfig:
    val_docs: int = 50000  # the challenge's val split: the first 50,000 documents
    shard_tokens: int = 100_000_000
    workers: int = 0  # tokenizer processes; 0: one per core
    # "": those processes here; "local": a Dask LocalCluster of them; "tcp://host:8786": an existing
    # Dask cluster across machines (its workers need this pgolf installed). The bytes out are the same.
    # The stage is the Dask client itself, so `dvc repro` and the Prefect flow both use the cluster
    # (why not Prefect's DaskTaskRunner: pgolf.data.shard_writer._ordered_map_dask).
    dask_address: str = ""
    adopt: str = ""  # a published shard folder (e.g. data/datasets/fineweb10B_sp1024) to validate and use

    def validate(self) -> None:
        check_range(self, "val_docs", ge=1)
        check_range(self, "shard_tokens", ge=1, lt=MAX_TOKENS)
        check_range(self, "workers", ge=0)
        if self.dask_address not in ("", "local") and ":" not in self.dask_address:
            raise ValueError(f"dask_address {self.dask_address!r}: expected '' (local processes), 'local' "
                             "(a Dask LocalCluster) or a scheduler address such as tcp://host:8786")
