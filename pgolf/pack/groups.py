"""The artifact's bytes by tensor group (embedding, attention, mlp, scales, passthrough): size.json's
`groups` and the bytes-by-group chart, so a competitor sees where the 16 MB go."""
from __future__ import annotations

from pgolf.model.families import block_part, is_embedding
from pgolf.pack.serialize import store_stream, tensor_bytes


def tensor_group(name: str) -> str:
    base = name.removesuffix(".q").removesuffix(".scale")
    if name.endswith(".scale"):
        return "scales"
    if is_embedding(base):
        return "embedding"
    part = block_part(base)
    if part is not None and name.endswith(".q"):
        return part
    return "passthrough"


def group_sizes(qm, raw_sizes: dict[str, int], compressor: str, level: int) -> dict[str, dict[str, int]]:
    """Raw bytes per group, and each group's bytes compressed on its own (an estimate of its share:
    the real artifact compresses everything together)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(raw_sizes):
        groups.setdefault(tensor_group(name), []).append(name)
    return {g: {"raw_bytes": sum(raw_sizes[n] for n in names),
                "compressed_bytes": len(store_stream(b"".join(tensor_bytes(qm.tensors[n]) for n in names), compressor,
                                                     level, try_shuffle=True)[0])}
            for g, names in sorted(groups.items())}
