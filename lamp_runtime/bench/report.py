"""Writing a bench's JSON and printing its table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` as indented JSON, atomically, so a reader never sees half a report.

    NaN (a ratio with nothing to divide by) is written as null: JSON has no NaN.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_without_nan(payload), indent=2, sort_keys=False) + "\n"
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a report is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _without_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: `columns` are (key, header, format spec) triples."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def full_command(prefix: str, parser, args) -> str:
    """The command that re-runs this bench exactly: `prefix` (`python -m MODULE`, `lamp bench NAME`) with every option of `parser`
    at the value it ran with (defaults resolved), so a later change of a default does not change
    what the recorded command means. Paths are written as given (relative to the repository root
    when run from there, as every documented command is)."""
    import argparse
    import shlex

    words = prefix.split()
    extra = []
    for action in parser._actions:
        value = _relative(getattr(args, action.dest, None))
        if not action.option_strings:  # positionals (e.g. extra arguments after --) go last
            extra += value if isinstance(value, list) else [] if value is None else [value]
            continue
        if action.dest == "help":
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch: written when it is on (BooleanOptionalAction: either form)
            if isinstance(action, argparse.BooleanOptionalAction):
                positive = next(o for o in action.option_strings if not o.startswith("--no-"))
                words.append(positive if value else "--no-" + positive[2:])
            elif value == action.const:
                words.append(flag)
            continue
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        words.append(flag)
        words.extend(str(v) for v in values)
    return shlex.join(words + (["--", *map(str, extra)] if extra else []))


REPO_ROOT = Path(__file__).resolve().parents[2]


def _relative(value):
    """A path inside the repository as the documented commands write it: relative to its root."""
    if isinstance(value, list):
        return [_relative(v) for v in value]
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        try:
            return str(Path(value).resolve().relative_to(REPO_ROOT))
        except ValueError:
            return str(value)
    return value
