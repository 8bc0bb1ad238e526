"""docs/lineage.md defines every record and PR code the code base's comments cite."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pgolf", "runner", "tasks", "bench", "flows", "presets", "tests")
RECORD = re.compile(r"\b(R1|R0\d{3}|RSW|RNB|RLORA)\b")
# "PR #1383", "PR1693", and bare "#549-era" / "#1670 /" (a colour like "#666" is followed by a quote).
PULL = re.compile(r"\bPR ?#?(\d{3,4})\b|(?<![\w&])#(\d{3,4})(?=[-, /)])")


def cited_codes() -> dict[str, str]:
    """anchor -> the first file citing it, over the repository's own files (git ls-files: not the
    other systems' scripts a bench reads from the git-ignored bench/reference/)."""
    out = {}
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", *SOURCES], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for path in sorted(ROOT / rel for rel in listed):
        if path.suffix not in (".py", ".yaml", ".sh") or not path.is_file() or path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8")
        for code in RECORD.findall(text):
            out.setdefault(code.lower(), str(path.relative_to(ROOT)))
        for pr, bare in PULL.findall(text):
            out.setdefault(f"pr{pr or bare}", str(path.relative_to(ROOT)))
    return out


def test_every_cited_code_has_an_entry():
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', (ROOT / "docs" / "lineage.md").read_text(encoding="utf-8")))
    cited = cited_codes()
    assert {"r1", "r0416", "pr1383", "pr549"} <= cited.keys()  # the scan itself finds codes
    missing = {code: where for code, where in cited.items() if code not in anchors}
    assert not missing, f"codes cited but not defined in docs/lineage.md: {missing}"


def test_every_link_inside_lineage_resolves():
    text = (ROOT / "docs" / "lineage.md").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    assert set(re.findall(r"\]\(#([^)]+)\)", text)) <= anchors
