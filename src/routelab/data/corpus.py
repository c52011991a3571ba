"""Text corpora as labelled domains: the built-in corpus (the running interpreter's standard library) and files.

The built-in corpus needs no network: English prose from the docstrings of the standard library's modules,
classes and functions (domain "prose"), and code from the same files' source text (domain "code"). Files are
visited in sorted order and each domain is capped at `max_chars` characters, so the corpus is a deterministic
function of the interpreter's standard library.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Packages of the standard library left out: tests (deliberately odd files), bundled third-party or generated code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "ensurepip", "__pycache__",
              "encodings", "pydoc_data", "turtledemo"}


class DataError(ValueError):
    """A data source that cannot be used (missing, unreadable, not UTF-8, empty); the message names the file."""


@dataclass(frozen=True)
class Domain:
    """One labelled body of text."""

    name: str
    text: str
    source: str  # where it came from, for the report


def builtin_corpus(*, max_chars: int = 2_000_000, min_doc_words: int = 6) -> list[Domain]:
    """The two-domain corpus ("prose", "code") built from the running interpreter's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(_python_files(stdlib), key=lambda p: p.relative_to(stdlib).as_posix())
    if not files:
        raise DataError(f"no Python source files found in the standard library at {stdlib}")
    prose: list[str] = []
    code: list[str] = []
    n_prose = n_code = 0
    for path in files:
        if n_prose >= max_chars and n_code >= max_chars:
            break
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if n_code < max_chars:
            code.append(source)
            n_code += len(source)
        if n_prose < max_chars:
            for doc in _docstrings(tree):
                if len(doc.split()) >= min_doc_words:
                    prose.append(doc)
                    n_prose += len(doc) + 2
    label = f"Python {'.'.join(map(str, sys.version_info[:3]))} standard library ({stdlib})"
    return [
        Domain("prose", "\n\n".join(prose)[:max_chars], f"docstrings of the {label}"),
        Domain("code", "\n".join(code)[:max_chars], f"source of the {label}"),
    ]


def _python_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        found.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return found


def _docstrings(tree: ast.Module) -> list[str]:
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            docs.append(inspect.cleandoc(doc))
    return docs


def file_corpus(paths: list[str | Path]) -> list[Domain]:
    """One domain per UTF-8 text file, named after the file's stem (made unique when two stems collide)."""
    if not paths:
        raise DataError("no data files given")
    domains: list[Domain] = []
    names: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if not path.is_file():
            raise DataError(f"data path is not a regular file: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"data file is not valid UTF-8: {path} ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None
        if not text.strip():
            raise DataError(f"data file is empty: {path}")
        name, n = path.stem, 2
        while name in names:
            name, n = f"{path.stem}-{n}", n + 1
        names.add(name)
        domains.append(Domain(name, text, str(path)))
    return domains
