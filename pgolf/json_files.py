"""JSON files whose bytes are what they hold: the same content gives the same bytes (DVC hashes them)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pgolf.errors import FormatError


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed separators) so identical content gives identical bytes.
    Strict: NaN and Infinity are not JSON, and a metric that holds one is a failed run, not a file
    that other tools misread, so it is an error naming the keys."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False)
    except ValueError as err:
        raise FormatError(f"refusing to write {', '.join(non_finite_keys(obj))} = NaN or Infinity, which strict JSON "
                          "cannot hold", path) from err
    Path(path).write_text(text + "\n", encoding="utf-8")


def non_finite_keys(obj: Any, where: str = "") -> list[str]:
    if isinstance(obj, float) and not math.isfinite(obj):
        return [where or "value"]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [key for k, v in items for key in non_finite_keys(v, f"{where}.{k}" if where else str(k))]
