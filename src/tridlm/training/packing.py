"""Tokenise documents and pack them into fixed-length rows held in memory-mapped files.

Each split is two files of shape [rows, seq_len]: ``<split>.tokens.bin`` (uint16 or uint32 ids) and
``<split>.loss_mask.bin`` (uint8; 0 = context only, never masked and never scored). A
``<split>.json`` beside them records the shape, the dtype and a key of everything the content depends
on, so a changed corpus, tokenizer or length rebuilds it.

Plain text is concatenated (documents separated by the end-of-text token) and cut into rows. Chats
are packed whole, greedily, and a row's tail is padded; the prompt is context (loss_mask 0), the
answer and the end tokens are scored. A chat longer than a row is cut at the row's end.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .corpora import Document

FORMAT_VERSION = 1


@dataclass
class PackedSplit:
    tokens: np.ndarray  # memmap [rows, seq_len]
    loss_mask: np.ndarray  # memmap [rows, seq_len], uint8

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


def chat_segments(doc: Document, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a chat: everything before the last assistant answer is context."""
    messages = doc.messages
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{doc.unit}: a chat for training must end with an assistant message")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(f"{doc.unit}: the chat template does not render the prompt as a prefix of the chat")
    p_ids = tokenizer.encode(prompt)
    a_ids = tokenizer.encode(full[len(prompt):]) + [tokenizer.eos_id]
    return p_ids + a_ids, [0] * len(p_ids) + [1] * len(a_ids)


def pack(docs: list[Document], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids and loss masks, in document order (the sampler shuffles rows later)."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    rows_ids: list[list[int]] = []
    rows_mask: list[list[int]] = []
    stream: list[int] = []  # plain text, concatenated
    cur_ids: list[int] = []  # the chat row being filled
    cur_mask: list[int] = []

    def close_chat_row():
        nonlocal cur_ids, cur_mask
        if cur_ids:
            n = seq_len - len(cur_ids)
            rows_ids.append(cur_ids + [pad] * n)
            rows_mask.append(cur_mask + [0] * n)
            cur_ids, cur_mask = [], []

    for doc in docs:
        if doc.is_chat:
            ids, mask = chat_segments(doc, tokenizer)
            ids, mask = ids[:seq_len], mask[:seq_len]
            if len(cur_ids) + len(ids) > seq_len:
                close_chat_row()
            cur_ids += ids
            cur_mask += mask
        else:
            stream.extend(tokenizer.encode(doc.text))
            stream.append(tokenizer.eos_id)
    close_chat_row()
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        rows_ids.append(stream[start:start + seq_len])
        rows_mask.append([1] * seq_len)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    ids_arr = np.asarray(rows_ids, dtype=dtype).reshape(-1, seq_len)
    mask_arr = np.asarray(rows_mask, dtype=np.uint8).reshape(-1, seq_len)
    return ids_arr, mask_arr


def content_key(docs: list[Document], tokenizer: Tokenizer, seq_len: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{FORMAT_VERSION}:{seq_len}:".encode())
    h.update(tokenizer.hf.to_str().encode())
    h.update(json.dumps(tokenizer.chat_template).encode())
    for d in docs:
        h.update(d.unit.encode())
        h.update(json.dumps(d.messages).encode() if d.is_chat else d.text.encode())
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_split(folder: Path, name: str, docs: list[Document], tokenizer: Tokenizer, seq_len: int) -> None:
    """Write the split's memory-mapped files unless an identical build is already there."""
    folder.mkdir(parents=True, exist_ok=True)
    key = content_key(docs, tokenizer, seq_len)
    meta_path = folder / f"{name}.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return
    ids, mask = pack(docs, tokenizer, seq_len)
    # the data files first, the metadata last: a build killed midway is rebuilt next time
    _write_atomic(folder / f"{name}.tokens.bin", ids.tobytes())
    _write_atomic(folder / f"{name}.loss_mask.bin", mask.tobytes())
    meta = {"key": key, "rows": int(ids.shape[0]), "seq_len": seq_len, "dtype": str(ids.dtype),
            "scored_tokens": int(mask.sum())}
    _write_atomic(meta_path, json.dumps(meta, indent=2).encode())


def open_split(folder: Path, name: str) -> PackedSplit:
    meta = json.loads((folder / f"{name}.json").read_text())
    shape = (meta["rows"], meta["seq_len"])
    if meta["rows"] == 0:
        empty = np.zeros(shape, dtype=meta["dtype"])
        return PackedSplit(empty, np.zeros(shape, dtype=np.uint8))
    tokens = np.memmap(folder / f"{name}.tokens.bin", dtype=meta["dtype"], mode="r", shape=shape)
    mask = np.memmap(folder / f"{name}.loss_mask.bin", dtype=np.uint8, mode="r", shape=shape)
    return PackedSplit(tokens, mask)
