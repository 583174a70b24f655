"""Corpus readers: every source becomes a deterministic, sorted stream of `Document`s.

Sources are the default corpus ("stdlib": the running interpreter's standard library, or
"stdlib:<package>" for one of its top-level packages), files, directories, globs, JSONL and
Parquet files, or `hf:<name>[:<split>]`. Unreadable items are reported through a callback with a
reason instead of crashing, so they show up in the stats.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nestlearn.config.schema import DEFAULT_CORPUS
from nestlearn.data.errors import DataError

Split = Literal["train", "val"]
SPLITS: tuple[Split, Split] = ("train", "val")
SkipHook = Callable[[str, str], None]  # (doc_id, reason)

_EXCLUDED_DIRS = {"site-packages", "dist-packages"}
_GLOB_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable within its source (a relative path, or path#record)
    text: str
    source: str  # the source's stable name


def split_of(doc_id: str, val_fraction: float) -> Split:
    """Train or val from a hash of the id alone: stable under reordering and added files."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction else "train"


def _ignore(_doc_id: str, _reason: str) -> None:
    return None


@dataclass(frozen=True)
class Source:
    """A resolved source: what to read (sorted files, or an HF dataset) and how to name it."""

    spec: str
    name: str
    text_field: str = "text"
    kind: Literal["files", "hf"] = "files"
    root: Path | None = None  # doc ids of files are relative to it
    files: tuple[Path, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What the prepared data depends on (for the fingerprint): cheap to compute, no reads."""
        if self.spec == DEFAULT_CORPUS:
            return {"spec": self.spec, "python": sys.version, "stdlib": str(self.root)}
        if self.kind == "hf":
            return {"spec": self.spec}
        listing = []
        for path in self.files:
            st = path.stat()
            listing.append([self._rel(path), st.st_size, st.st_mtime_ns])
        return {"spec": self.spec, "root": str(self.root), "files": listing}

    def documents(self, on_skip: SkipHook | None = None) -> Iterator[Document]:
        """Documents in a deterministic order; skipped items go to `on_skip(doc_id, reason)`.

        Files are read in the order of a hash of their relative path, a fixed shuffle: a
        capped corpus (`max_docs`, `max_chars_per_source`) is then a representative sample
        of the whole, not its alphabetically first directories.
        """
        skip = on_skip or _ignore
        if self.kind == "hf":
            yield from self._hf_documents(skip)
            return
        for path in sorted(self.files, key=lambda p: hashlib.sha256(self._rel(p).encode()).digest()):
            rel = self._rel(path)
            if path.suffix == ".jsonl":
                yield from self._jsonl_documents(path, rel, skip)
            elif path.suffix == ".parquet":
                yield from self._parquet_documents(path, rel, skip)
            else:
                text = _read_text(path, rel, skip)
                if text is not None:
                    yield Document(rel, text, self.name)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if self.root else path.name

    def _jsonl_documents(self, path: Path, rel: str, skip: SkipHook) -> Iterator[Document]:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                doc_id = f"{rel}#{number}"
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    skip(doc_id, "not_utf8")
                    continue
                except json.JSONDecodeError:
                    skip(doc_id, "bad_json")
                    continue
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if isinstance(text, str):
                    yield Document(doc_id, text, self.name)
                else:
                    skip(doc_id, "missing_field")

    def _parquet_documents(self, path: Path, rel: str, skip: SkipHook) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"source '{self.spec}': reading {path} needs pyarrow; "
                            "install it with `pip install nestlearn[parquet]`") from None
        table = pq.ParquetFile(path)
        if self.text_field not in table.schema_arrow.names:
            raise DataError(f"{path} has no column '{self.text_field}' "
                            f"(columns: {', '.join(table.schema_arrow.names)}); set data.text_field")
        row = 0
        for batch in table.iter_batches(columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                doc_id = f"{rel}#{row}"
                row += 1
                if isinstance(text, str):
                    yield Document(doc_id, text, self.name)
                else:
                    skip(doc_id, "missing_field")

    def _hf_documents(self, skip: SkipHook) -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise DataError(f"source '{self.spec}' needs the optional `datasets` package; "
                            "install it with `pip install nestlearn[hf]`") from None
        _, name, split = [*self.spec.split(":", 2), "train"][:3]
        records = datasets.load_dataset(name, split=split, streaming=True)
        for index, record in enumerate(records):
            doc_id = f"{name}:{split}#{index}"
            text = record.get(self.text_field)
            if isinstance(text, str):
                yield Document(doc_id, text, self.name)
            else:
                skip(doc_id, "missing_field")


def _read_text(path: Path, rel: str, skip: SkipHook) -> str | None:
    """The file as text, bytes kept exactly (no newline translation); None if not text."""
    try:
        data = path.read_bytes()
    except OSError:
        skip(rel, "unreadable")
        return None
    if b"\x00" in data[:8192]:
        skip(rel, "binary")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        skip(rel, "not_utf8")
        return None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _visible_files(root: Path, suffix: str = "") -> list[Path]:
    """Files under `root` ending in `suffix`; hidden and third-party package dirs are pruned."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith(".")]
        found.extend(Path(folder, f) for f in files
                     if f.endswith(suffix) and not f.startswith("."))
    return sorted(p for p in found if p.is_file())


def _glob_root(spec: str) -> Path:
    """The directory part of a glob before its first wildcard: doc ids are relative to it."""
    parts = Path(spec).parts
    first_magic = next(i for i, p in enumerate(parts) if _GLOB_MAGIC.search(p))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def _resolve_files(spec: str) -> tuple[Path | None, list[Path]]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve(), _visible_files(path.resolve())
    if path.is_file():
        return None, [path.resolve()]
    if _GLOB_MAGIC.search(spec):
        root = _glob_root(spec).resolve()
        files: set[Path] = set()
        for match in map(Path, glob.glob(spec, recursive=True)):
            if match.is_dir():
                files.update(_visible_files(match.resolve()))
            elif match.is_file():
                files.add(match.resolve())
        return root, sorted(files)
    return None, []


def source_name(spec: str) -> str:
    """A short, filesystem-safe name for a source spec (used for directories and stats keys)."""
    if spec == DEFAULT_CORPUS:
        return DEFAULT_CORPUS
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.strip("/")).strip("-.") or "source"
    if len(slug) > 48:
        slug = f"{slug[:39]}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    return slug


def unique_names(specs: list[str]) -> list[str]:
    """One name per spec; a repeated name gets its position appended to stay unique."""
    names = [source_name(s) for s in specs]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _stdlib_part(spec: str, name: str, text_field: str) -> Source:
    """``stdlib:<package>``: one top-level package (or module) of the default corpus, with doc
    ids as in the whole corpus (e.g. ``email/parser.py``), for segments of continual learning."""
    part = spec.split(":", 1)[1]
    root = stdlib_root()
    target = root / part
    files = (_visible_files(target, ".py") if target.is_dir() and "/" not in part and part not in _EXCLUDED_DIRS
             else [root / f"{part}.py"] if "/" not in part and (root / f"{part}.py").is_file() else [])
    if not files:
        raise DataError(f"source '{spec}': the standard library at {root} has no top-level package or module "
                        f"{part!r}; expected e.g. stdlib:email")
    return Source(spec, name, text_field, "files", root, tuple(files))


def open_source(spec: str, *, text_field: str = "text", name: str | None = None) -> Source:
    """Resolve a source spec; a spec that matches nothing raises `DataError`."""
    name = name or source_name(spec)
    if spec == DEFAULT_CORPUS:
        root = stdlib_root()
        return Source(spec, name, text_field, "files", root, tuple(_visible_files(root, ".py")))
    if spec.startswith(f"{DEFAULT_CORPUS}:"):
        return _stdlib_part(spec, name, text_field)
    if spec.startswith("hf:"):
        if len(spec) <= 3:
            raise DataError(f"source '{spec}': expected hf:<dataset name>[:<split>]")
        return Source(spec, name, text_field, "hf")
    base, files = _resolve_files(spec)
    if not files:
        raise DataError(f"source '{spec}': no such file, directory or glob match; "
                        "fix data.sources (paths are relative to the working directory)")
    return Source(spec, name, text_field, "files", base, tuple(files))
