"""One self-contained train_gpt.py from the pipeline's own modules, as the challenge counts code.

The script carries every module its entry point imports, as source text, and a small import hook
that serves them, so the package layout (and every name in it) is exactly the pipeline's: no
renaming, no copies that drift. Only pip packages (torch, numpy, sentencepiece, ...) come from
outside.
"""
from __future__ import annotations

import json
from pathlib import Path

from pgolf.pack.codesize import import_closure

LOADER = '''import importlib.abc, importlib.util, json, sys


class _BundledModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the pipeline modules embedded below as if they were files on disk."""

    def find_spec(self, name, path=None, target=None):
        if name in _SOURCES:
            return importlib.util.spec_from_loader(name, self, is_package=name in _PACKAGES)
        return None

    def create_module(self, spec):
        return None

    def get_source(self, name):
        # inspect.getsource reads bundled code through this (tracebacks; Triton's JIT needs its kernels' source).
        return _SOURCES[name]

    def exec_module(self, module):
        module.__file__ = "<bundled>/" + module.__name__.replace(".", "/") + ".py"
        if module.__name__ in _PACKAGES:
            module.__path__ = []
        exec(compile(_SOURCES[module.__name__], module.__file__, "exec"), module.__dict__)


sys.meta_path.insert(0, _BundledModules())
'''


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


# Modules only the pipeline's stages run, each imported inside a function the script never calls:
# this bundler (the pack stage counts a script with it) and the train stage's plots. Left out, they
# cost the submission no bytes; tests/test_pack.py checks no bundled module imports them at its top.
PIPELINE_ONLY = ("pgolf/pack/single_file.py", "pgolf/train/plots.py")


def bundled_files(entry: Path, root: Path) -> list[Path]:
    """The modules a script bundles: everything `entry` imports but PIPELINE_ONLY."""
    left_out = {(root / rel).resolve() for rel in PIPELINE_ONLY}
    return [path for path in import_closure(entry, root) if path not in left_out]


def bundle_script(entry: Path, root: Path, params: dict, header: str) -> str:
    sources, packages = {}, []
    for path in bundled_files(entry, root):
        name, is_package = module_name(path, root)
        sources[name] = path.read_text(encoding="utf-8")
        if is_package:
            packages.append(name)
    entry_module, _ = module_name(entry, root)
    lines = [
        "".join(f"# {line}\n" for line in header.splitlines()),
        f"_SOURCES = {json.dumps(dict(sorted(sources.items())), indent=0, ensure_ascii=False)}\n",
        f"_PACKAGES = {json.dumps(sorted(packages))}\n",
        LOADER,
        f"PARAMS = json.loads({json.dumps(json.dumps(params, sort_keys=True))})\n\n",
        'if __name__ == "__main__":\n',
        f"    from {entry_module} import main\n",
        "    sys.exit(main(PARAMS, __file__))\n",
    ]
    return "\n".join(lines)
