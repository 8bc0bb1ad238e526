"""Outputs restored from DVC's cache are checked against dvc.lock before anything trusts them.

DVC (3.x) restores a stage's outputs from its cache or run-cache by copying the object that
dvc.lock's md5 names, without hashing it again, and records that md5 for the copy in its state db:
a corrupted cache object (a flipped bit on disk, a truncated copy) is restored, read by the stages
after it, and nothing says so. Two checks close that:

- after `dvc repro` (`pgolf run`: flows/repro.py reproduce), each stage that did not run has its
  outputs hashed as DVC hashes them and compared with dvc.lock; on a mismatch the corrupt cache
  objects are removed (else DVC, seeing an object of that name, would keep it when the stage
  reruns), the stage is recomputed (forced), and the pipeline reproduced again so that anything
  downstream follows;
- when DVC runs a stage (bin/stage), the inputs that are other stages' outputs are checked the same
  way first, so that no stage computes from corrupt bytes; a mismatch is an error naming the file,
  which `pgolf run` then repairs.

Digests are remembered by (size, mtime, ctime, inode) in .dvc/tmp/pgolf-verified.json, as the shard
verifier does (pgolf/data/shards.py), so an unchanged file is hashed once. Only the standard library
and yaml: bin/stage runs this before every stage, and it must not cost a torch import.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from pgolf.errors import FormatError, PgolfError, StageInterrupted

STAMP_PATH = Path(".dvc") / "tmp" / "pgolf-verified.json"
# What .dvcignore keeps out of every output's hash.
IGNORED_DIRS = {"__pycache__"}
IGNORED_SUFFIXES = (".pyc",)
MAX_ROUNDS = 3


class CorruptInputError(FormatError):
    """A stage's input differs from what dvc.lock records for it (a corrupt cache entry restored)."""


def md5_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


class Hasher:
    """md5 of files and of folders as DVC computes them, with the (size, mtime, ctime, inode) fast path."""

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.stamp_path = self.workspace / STAMP_PATH
        try:
            stamp = json.loads(self.stamp_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stamp = {}  # none yet, or damaged: hash again
        self.stamp: dict = stamp if isinstance(stamp, dict) else {}
        self.changed = False

    def file(self, path: Path) -> str:
        st = path.stat()
        identity = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = str(path.resolve())
        known = self.stamp.get(key)
        if isinstance(known, dict) and known.get("identity") == identity:
            return known["md5"]
        digest = md5_file(path)
        self.stamp[key] = {"identity": identity, "md5": digest}
        self.changed = True
        return digest

    def out(self, path: Path) -> str | None:
        """The md5 dvc.lock would record for `path` (a folder's ends in .dir), None if it is missing."""
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return None
        return tree_digest([{"md5": self.file(f), "relpath": f.relative_to(path).as_posix()} for f in tree_files(path)])

    def save(self) -> None:
        """Best effort: a workspace that cannot keep the stamp only hashes again next time."""
        if not self.changed:
            return
        tmp = self.stamp_path.with_name(f"{self.stamp_path.name}.tmp-{os.getpid()}")
        try:
            self.stamp_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.stamp_path)
        except OSError:
            tmp.unlink(missing_ok=True)


def tree_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in IGNORED_DIRS]
        files += [Path(root) / n for n in names if not n.endswith(IGNORED_SUFFIXES)]
    return files


def tree_digest(entries: list[dict]) -> str:
    """dvc_data's Tree.digest: md5 of the sorted [{md5, relpath}] list as JSON, plus '.dir'."""
    body = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode("utf-8")
    return hashlib.md5(body).hexdigest() + ".dir"


def read_lock(workspace: Path) -> dict[str, list[dict]]:
    """stage -> its outs in dvc.lock ({path, md5, ...}); {} without a lock file."""
    path = Path(workspace) / "dvc.lock"
    try:
        # libyaml's parser where PyYAML has it: the same document, a tenth of the time
        lock = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as err:
        raise FormatError(f"not valid YAML: {err}", path) from err
    return {name: [o for o in (stage.get("outs") or []) if o.get("md5")]
            for name, stage in (lock.get("stages") or {}).items()}


def mismatches(workspace: Path, stages: list[str], hasher: Hasher) -> list[tuple[str, str, str | None, str]]:
    """(stage, out path, workspace md5, dvc.lock md5) for each out of `stages` that differs."""
    lock = read_lock(workspace)
    bad = []
    for stage in stages:
        for out in lock.get(stage, []):
            actual = hasher.out(Path(workspace) / out["path"])
            if actual is not None and actual != out["md5"]:
                bad.append((stage, out["path"], actual, out["md5"]))
    return bad


def cache_dir(workspace: Path) -> Path:
    """DVC's cache: `[cache] dir` of .dvc/config.local or .dvc/config (relative to .dvc), else .dvc/cache."""
    dvc = Path(workspace) / ".dvc"
    for name in ("config.local", "config"):
        try:
            text = (dvc / name).read_text(encoding="utf-8")
        except OSError:
            continue
        section = re.search(r"^\[cache\][^\[]*?^\s*dir\s*=\s*(.+?)\s*$", text, re.M | re.S)
        if section:
            return (dvc / section.group(1)).resolve()
    return dvc / "cache"


def object_path(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def remove_corrupt_objects(workspace: Path, md5: str) -> list[Path]:
    """Remove the cache objects behind dvc.lock's `md5` whose bytes do not hash to their name: for a
    folder, its .dir manifest and every file object it lists."""
    cache = cache_dir(workspace)
    removed = []

    def check(oid: str, path: Path, digest: str) -> bool:
        if path.is_file() and digest != oid:
            path.unlink()
            removed.append(path)
            return False
        return True

    path = object_path(cache, md5)
    if not md5.endswith(".dir"):
        if path.is_file():
            check(md5, path, md5_file(path))
        return removed
    if not path.is_file():
        return removed
    body = path.read_bytes()
    if not check(md5, path, hashlib.md5(body).hexdigest() + ".dir"):
        return removed
    try:
        entries = json.loads(body)
    except ValueError:
        return removed
    for entry in entries if isinstance(entries, list) else []:
        oid = entry.get("md5") if isinstance(entry, dict) else None
        if isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{32}", oid):
            obj = object_path(cache, oid)
            if obj.is_file():
                check(oid, obj, md5_file(obj))
    return removed


def check_stage_inputs(stage: str, workspace: Path = Path(".")) -> None:
    """Before DVC runs `stage`: each dep that is another stage's out must have dvc.lock's md5."""
    workspace = Path(workspace)
    try:
        deps = (yaml.safe_load((workspace / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage].get("deps") or [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return  # no pipeline here to check against (a stage run outside a DVC workspace)
    producers = {out["path"]: (name, out["md5"]) for name, outs in read_lock(workspace).items()
                 if name != stage for out in outs}
    hasher = Hasher(workspace)
    try:
        for dep in deps:
            if dep not in producers:
                continue
            producer, expected = producers[dep]
            actual = hasher.out(workspace / dep)
            if actual is not None and actual != expected:
                removed = remove_corrupt_objects(workspace, expected)
                what = (f"removed {len(removed)} corrupt object(s) from DVC's cache ({', '.join(str(p) for p in removed)})"
                        if removed else "the cache objects hash right, so the workspace copy was changed")
                raise CorruptInputError(
                    f"input of stage '{stage}' has md5 {actual} but dvc.lock records {expected} for stage "
                    f"'{producer}', which wrote it: a corrupted DVC cache entry was restored, or the file was "
                    f"edited; {what}. `pgolf run` recomputes '{producer}', or run "
                    f"`dvc repro --force --single-item {producer}` and then this stage again", workspace / dep)
    finally:
        hasher.save()


def repro_checked(workspace: Path, stage: str | None, force: bool, echo: bool,
                  repro: Callable[[Path, str | None, bool, bool], None]) -> None:
    """`repro(workspace, stage, force, echo)` (dvc repro), then each stage that did not run has its
    outputs checked; corrupt ones are purged from the cache and recomputed, and the pipeline
    reproduced again, until everything matches dvc.lock."""
    from runner.records import read_run_record
    from tasks.stages import STAGES, out_of

    workspace = Path(workspace)
    scope = [stage] if stage else list(STAGES)
    for _ in range(MAX_ROUNDS):
        started = time.time()
        failure: PgolfError | None = None
        try:
            repro(workspace, stage, force, echo)
        except StageInterrupted:
            raise  # Ctrl-C: nothing to repair
        except PgolfError as err:  # a stage may have refused a corrupt input: repair it, then retry
            failure = err
        # A stage that refused its input names a producer outside a one-stage scope: check them all.
        unrun = [s for s in (scope if failure is None else list(STAGES))
                 if (r := read_run_record(workspace / out_of(s))) is None
                 or r.get("started", 0) < started]
        hasher = Hasher(workspace)
        try:
            bad = mismatches(workspace, unrun, hasher)
        finally:
            hasher.save()
        if not bad:
            if failure is not None:
                raise failure
            return
        for name, path, actual, expected in bad:
            removed = remove_corrupt_objects(workspace, expected)
            log(f"pgolf: {path} (stage {name}) has md5 {actual}, but dvc.lock records {expected}: a corrupt "
                f"cache entry was restored; removed {len(removed)} corrupt cache object(s), recomputing {name}")
        for name in [s for s in STAGES if s in {b[0] for b in bad}]:
            repro(workspace, name, True, echo)
        force = False  # the next round reruns only what the recomputed outputs changed
    raise PgolfError(f"outputs in {workspace} still differ from dvc.lock after {MAX_ROUNDS} rounds of recomputing "
                     "them; check the disk that holds .dvc/cache")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    # bin/stage: `python -m runner.cache_check STAGE` before the stage itself runs under DVC.
    try:
        check_stage_inputs(sys.argv[1])
    except PgolfError as err:
        print(f"pgolf {sys.argv[1]}: error: {err}", file=sys.stderr)
        sys.exit(2)
