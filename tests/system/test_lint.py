"""The project's static checks run inside the test command: `ruff check`
with the configuration in pyproject.toml, and every citation of the design
(`design §N`) naming a section that docs/design.md has."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    # the tool installed beside this interpreter (the test extra), else on PATH
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def test_ruff_check_is_clean():
    done = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_design_citations_name_sections_that_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", design, flags=re.M)}
    cited = {}
    for folder in ("act_kernels", "csrc", "bench", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".cu", ".h", ".cpp", ".md", ".sh") or path.name == "design.md":
                continue
            for first, last in re.findall(r"design §(\d+)(?:-§(\d+))?", path.read_text(errors="ignore")):
                for n in {int(first), int(last or first)}:
                    cited.setdefault(n, []).append(str(path.relative_to(ROOT)))
    assert cited, "no citations found: the pattern no longer matches how the code cites the design"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"cited sections that docs/design.md lacks: {missing}"
    for old in ("DESIGN §",):
        stale = [str(p.relative_to(ROOT)) for p in (ROOT / "act_kernels").rglob("*.py") if old in p.read_text()]
        assert not stale, f"{old!r} cites a document outside the repository: {stale}"


def test_import_contract_is_kept():
    """design §12's layers and family independence (pyproject.toml's
    [tool.importlinter] contracts), checked on the import graph."""
    done = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
