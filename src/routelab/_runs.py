"""Run folders: what a routelab command may write, overwrite and delete under its `--out` folder.

Every command that writes a folder of results (`compare`, later `train`) follows the same rules, through this module:

- **A marker names the run.** Every folder routelab creates or claims holds `.routelab-run.json`, naming the command,
  the run id and the file-name patterns of the outputs that command writes there. A folder with a valid marker is
  *owned*; nothing else is.
- **Deletion is proven.** routelab deletes only regular files whose names match the patterns in an owned folder's
  marker (and stale temporaries of `routelab._atomic`'s naming in owned folders), and removes a folder only when it
  is owned and empty after that. Any other file — a user's notes beside the results, a folder without a marker —
  is left alone.
- **No links.** Below `--out` nothing is written, read for ownership or deleted through a symbolic link: a link
  where routelab would write is an error. (`--out` itself may be a link to a folder: the user named it.)
- **Foreign folders are refused.** A non-empty `--out` (or planned sub-folder) without a marker is refused unless
  the caller passes `overwrite=True` (the CLI's `--overwrite`), which claims it: routelab then writes its outputs
  there, replacing files of the same names, and still deletes nothing it cannot prove it wrote.
- **Fresh or resumed.** Without `resume`, the outputs of an earlier run in owned folders are deleted before the new
  run writes anything, so no stale report can sit beside a new configuration. With `resume` they are kept (the
  command decides what to reuse); stale temporaries are removed either way.

API (all paths are `pathlib.Path`; errors are `RunFolderError`, one line, naming the flag and the path):

    layout = RunLayout("compare", {"": ("config.yaml", "report.md"), "variants/topk": ("metrics.jsonl",)})
    check_out(out, layout, overwrite=False)          # read-only checks, before any slow work
    run_id = claim_out(out, layout, resume=False)   # create folders, write markers, clean; returns the run id
    remove_stale_temporaries(folder)                # used by writers of owned folders (e.g. the training loop)
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from routelab._atomic import atomic_write_text

MARKER = ".routelab-run.json"
MARKER_FORMAT = 1
# routelab._atomic writes `.{name}.{16 hex}.tmp` beside the target and renames it; a kill in between leaves one.
TEMPORARY = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")


class RunFolderError(ValueError):
    """An output folder routelab must not (or cannot) write; the message names the flag and the path."""


@dataclass(frozen=True)
class RunLayout:
    """What one command writes: `folders` maps a folder relative to `--out` ("" for `--out` itself, "/"-separated)
    to the glob patterns of the files the command writes there. Parents of listed folders are owned too (with no
    outputs of their own unless listed)."""

    command: str
    folders: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def all_folders(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {"": ()}
        for rel, patterns in self.folders.items():
            parts = [p for p in rel.split("/") if p]
            for i in range(len(parts)):
                out.setdefault("/".join(parts[:i]), ())
            out["/".join(parts)] = tuple(patterns)
        return dict(sorted(out.items(), key=lambda kv: kv[0].count("/") + bool(kv[0])))


def read_marker(folder: Path) -> dict | None:
    """The marker of `folder` (a regular file, not a link, holding a routelab marker), or None."""
    path = Path(folder) / MARKER
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 16:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("routelab") != "run" or not isinstance(data.get("command"), str):
        return None
    outputs = data.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(p, str) for p in outputs):
        return None
    return data


def check_out(out: str | Path, layout: RunLayout, *, overwrite: bool = False, flag: str = "--out") -> None:
    """Raise a RunFolderError unless `layout` can be written under `out` by these rules. Reads only."""
    if str(out) == "":
        raise RunFolderError(f"{flag} must name a folder, got an empty string")
    out = Path(out)
    existing = _nearest_existing(out, flag)
    if existing != out:  # the folder will be created under `existing`
        _check_writable(existing, flag, creating=out)
        return
    if not out.is_dir():
        raise RunFolderError(f"{flag} must be a folder (existing or new), but {out} is a file")
    _check_writable(out, flag)
    for rel, patterns in layout.all_folders().items():
        folder = out / rel if rel else out
        if rel:
            if not os.path.lexists(folder):
                continue
            if os.path.islink(folder):
                raise RunFolderError(f"{flag}: {folder} is a symbolic link; routelab does not write through links "
                                     f"(remove it or choose another {flag})")
            if not folder.is_dir():
                raise RunFolderError(f"{flag}: {folder} must be a folder, but it is a file")
            _check_writable(folder, flag)
        if os.path.islink(folder / MARKER):
            raise RunFolderError(f"{flag}: {folder / MARKER} is a symbolic link; remove it")
        marker = read_marker(folder)
        if marker is None and any(os.scandir(folder)) and not overwrite:
            what = f"{flag} {folder}" if not rel else f"{folder} (inside {flag})"
            raise RunFolderError(f"{what} is not empty and is not a routelab run; routelab writes only into new, "
                                 f"empty or its own folders (pass --overwrite to write there anyway)")
        if marker is not None and marker["command"] != layout.command and not overwrite:
            raise RunFolderError(f"{flag} {folder} holds a `routelab {marker['command']}` run, not a "
                                 f"`routelab {layout.command}` one (choose another {flag} or pass --overwrite)")
        for pattern in patterns:
            for entry in _matching(folder, pattern):
                if entry.is_symlink():
                    raise RunFolderError(f"{flag}: {entry.path} is a symbolic link where routelab writes its "
                                         f"output; remove it or choose another {flag}")
                if entry.is_dir(follow_symlinks=False):
                    raise RunFolderError(f"{flag}: {entry.path} is a folder where routelab writes a file")


def claim_out(
    out: str | Path, layout: RunLayout, *, resume: bool, overwrite: bool = False, flag: str = "--out"
) -> str:
    """Check (as `check_out`), then create the layout's folders, write their markers and clean: always the stale
    temporaries of owned folders; without `resume` also the outputs of an earlier run (every owned folder below
    `out`, including folders of variants no longer in the layout). Returns the run id (kept on resume)."""
    check_out(out, layout, overwrite=overwrite, flag=flag)
    out = Path(out)
    previous = read_marker(out)
    run_id = previous["run"] if resume and previous and isinstance(previous.get("run"), str) else secrets.token_hex(8)
    if not resume:
        _clean_owned(out, top=True)
    out.mkdir(parents=True, exist_ok=True)
    for rel, patterns in layout.all_folders().items():
        folder = out / rel if rel else out
        folder.mkdir(exist_ok=True)
        if os.path.islink(folder) or not folder.is_dir():  # raced with someone creating a link: refuse, not follow
            raise RunFolderError(f"{flag}: {folder} is not a plain folder")
        remove_stale_temporaries(folder)
        write_marker(folder, command=layout.command, run_id=run_id, outputs=patterns)
    return run_id


def write_marker(folder: Path, *, command: str, run_id: str, outputs: tuple[str, ...] | list[str]) -> None:
    atomic_write_text(Path(folder) / MARKER, json.dumps({
        "routelab": "run", "format": MARKER_FORMAT, "command": command, "run": run_id,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "outputs": list(outputs),
    }, indent=1) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries `routelab._atomic` leaves when a process dies between writing and renaming
    (`.{name}.{16 hex}.tmp`, regular files only) in `folder`; returns what was deleted."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def _clean_owned(folder: Path, *, top: bool) -> None:
    """Delete an earlier run's outputs in owned `folder` and, recursively, in its owned sub-folders (never through
    links). Sub-folders end up removed when empty; `folder` itself is kept when `top`."""
    marker = read_marker(folder)
    if marker is None or os.path.islink(folder):
        return
    for entry in list(os.scandir(folder)):
        if entry.is_dir(follow_symlinks=False):
            _clean_owned(Path(entry.path), top=False)
        elif entry.is_file(follow_symlinks=False) and (
            any(fnmatch.fnmatchcase(entry.name, p) for p in marker["outputs"]) or TEMPORARY.fullmatch(entry.name)
        ):
            Path(entry.path).unlink(missing_ok=True)
    if not top and [e.name for e in os.scandir(folder)] == [MARKER]:  # nothing but ours left: remove the folder
        (folder / MARKER).unlink()
        folder.rmdir()


def _matching(folder: Path, pattern: str) -> list[os.DirEntry]:
    return [e for e in os.scandir(folder) if fnmatch.fnmatchcase(e.name, pattern)]


def _nearest_existing(out: Path, flag: str) -> Path:
    for path in (out, *out.parents):
        if os.path.lexists(path):
            if not path.is_dir():
                what = flag if path == out else f"{flag}'s parent {path}"
                raise RunFolderError(f"{what} must be a folder (existing or new), but {path} is a file")
            return path
    return Path(".")


def _check_writable(folder: Path, flag: str, *, creating: Path | None = None) -> None:
    # effective ids: what the process may do (equal to the real ones unless a setuid program or a test lowered them)
    effective = os.access in os.supports_effective_ids
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=effective):
        target = f" to create {creating}" if creating is not None else ""
        raise RunFolderError(f"{flag}: cannot write to {folder}{target} (permission denied or read-only)")
