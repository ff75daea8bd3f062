"""The README's map ("How it works") and the tree stay equal.

The map is a code block of entries: a name column (`serving/`, then indented `http/`, `cli.py,
serve_command.py`, ...) and a description that may run on over indented lines. The rule:
- every name in the name column exists (relative to the entry it sits under);
- every module of lamp_runtime/ and serving/ is named: a package's module `x.py` either has an
  entry of its own under the package's entry, or the package's entry (name column and description)
  names it as `x` or `x.py`; a subpackage `q/` with no entry of its own is named as `q/` in its
  parent's entry, and its modules are named in that same entry. `__init__.py` is its package.
- every `x.py` or `q/` the description of a package's entry names exists in that package (or, as a
  path from the repository root, there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lamp_runtime", "serving")
DESCRIPTION_COLUMN = 20  # name columns are narrower; a line indented this far continues a description


@dataclass
class Entry:
    path: Path  # the folder the entry's names are relative to (its parent entry's folder)
    names: list[str]
    text: str  # names and description, continuation lines included
    children: list["Entry"] = field(default_factory=list)

    @property
    def folder(self) -> Path | None:
        """The package this entry stands for, when it names one folder."""
        folders = [n for n in self.names if n.endswith("/")]
        return self.path / folders[0].rstrip("/") if len(folders) == 1 else None


def readme_map(readme: str) -> list[Entry]:
    section = readme.split("## How it works", 1)[1]
    block = section.split("```", 2)[1]
    top: list[Entry] = []
    last: Entry | None = None
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent >= DESCRIPTION_COLUMN:
            last.text += " " + line.strip()
            continue
        name_column, _, description = line.strip().partition("  ")
        names = [n.strip() for n in name_column.split(",")]
        if indent == 0:
            last = Entry(ROOT, names, f"{name_column} {description}")
            top.append(last)
        else:
            parent = top[-1]
            last = Entry(parent.folder, names, f"{name_column} {description}")
            parent.children.append(last)
    return top


def entries() -> list[Entry]:
    found = []
    for entry in readme_map((ROOT / "README.md").read_text(encoding="utf-8")):
        found.append(entry)
        found.extend(entry.children)
    return found


def named(word: str, text: str) -> bool:
    return re.search(rf"(?<![\w./]){re.escape(word)}(?![\w/])", text) is not None


def test_the_map_is_read():
    """Guards against vacuous success: the map has the known entries, nested and continued."""
    by_folder = {e.folder: e for e in entries() if e.folder}
    assert ROOT / "serving" / "store" in by_folder
    assert "registry/" in by_folder[ROOT / "serving" / "store"].text
    assert any(e.names == ["cli.py", "serve_command.py"] for e in entries())


@pytest.mark.parametrize("entry", entries(), ids=lambda e: ", ".join(e.names))
def test_every_name_in_the_map_exists(entry):
    missing = [n for n in entry.names if not (entry.path / n).exists()]
    assert not missing, f"the README's map names {missing} under {entry.path.relative_to(ROOT)}/, which do not exist"


def test_every_file_a_package_entry_describes_exists():
    missing = []
    for entry in entries():
        if entry.folder is None:
            continue
        for word in re.findall(r"(?<![\w./])([\w/.]+(?:\.py|/))(?![\w/])", entry.text):
            if word not in entry.names and not ((entry.folder / word).exists() or (ROOT / word).exists()):
                missing.append(f"{entry.folder.relative_to(ROOT)}: {word}")
    assert not missing, f"the README's map describes files that do not exist: {missing}"


def unnamed_modules() -> list[str]:
    by_folder = {e.folder: e for e in entries() if e.folder}
    # Every entry's text counts for the package it sits in (`cli.py, serve_command.py` under serving/).
    own_entries: dict[Path, list[Entry]] = {}
    for entry in entries():
        own_entries.setdefault(entry.path, []).append(entry)
    missing = []
    for package in PACKAGES:
        for module in sorted((ROOT / package).rglob("*.py")):
            folder = module.parent
            stem = folder.name if module.name == "__init__.py" else module.stem
            if module.name == "__init__.py":
                folder = folder.parent
            # The nearest package with an entry of its own speaks for the packages below it.
            covering, prefix = folder, ""
            while covering not in by_folder and covering != ROOT:
                prefix = f"{covering.name}/{prefix}"
                covering = covering.parent
            texts = [by_folder[covering].text] if covering in by_folder else []
            texts += [e.text for e in own_entries.get(covering, [])]
            word = f"{stem}/" if module.name == "__init__.py" else stem
            if prefix and module.name != "__init__.py" and not any(named(prefix, t) for t in texts):
                word = prefix  # the subpackage itself is not named: report it
            if not any(named(word, t) or named(f"{word}.py", t) for t in texts):
                missing.append(str(module.relative_to(ROOT)))
    return missing


def test_every_module_is_in_the_map():
    missing = unnamed_modules()
    assert not missing, f"modules the README's map does not name: {missing}"
