"""Offline corpora, the BPE tokenizer, packing into memory-mapped rows, and the deterministic order."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tridlm.training.bpe import CHATML_TEMPLATE, IM_END, SPECIAL_TOKENS, train_bpe
from tridlm.training.corpora import DEFAULT_GSM8K, Document, resolve_source, split_documents
from tridlm.training.packing import build_split, open_split, pack
from tridlm.training.quick import write_micro_corpus
from tridlm.training.sampler import SampleOrder


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["To be, or not to be: that is the question.\n" * 50, "What light through yonder window?"] * 4,
                     vocab_size=300)


def test_bpe_carries_the_special_tokens(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.mask_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (2, 0, 0, 1)
    assert tokenizer.vocab_size == 300
    text = "To be, or not to be?"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_bpe_refuses_a_vocabulary_too_small_for_bytes():
    with pytest.raises(ValueError, match="tokenizer.vocab_size must be at least 261"):
        train_bpe(["abc"], vocab_size=100)


def test_split_holds_out_whole_files(tmp_path):
    data = write_micro_corpus(tmp_path / "d", files=10, chars_per_file=300)
    train, val = split_documents([str(data)], val_fraction=0.3)
    assert val and train
    assert {d.unit for d in train}.isdisjoint({d.unit for d in val})
    assert len(train) + len(val) == 10  # each file is one document, in exactly one split
    again_train, again_val = split_documents([str(data)], val_fraction=0.3)
    assert [d.unit for d in again_val] == [d.unit for d in val]
    # the same files elsewhere (another clone, another temporary folder) split the same way
    moved = write_micro_corpus(tmp_path / "elsewhere" / "deeper", files=10, chars_per_file=300)
    _, moved_val = split_documents([str(moved)], val_fraction=0.3)
    assert [d.unit for d in moved_val] == [d.unit for d in val]


def test_stdlib_source_is_found_through_sysconfig_sorted_without_tests():
    files = resolve_source("stdlib")
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 300
    paths = [f.path for f in files]
    assert paths == sorted(paths)
    assert all(root in p.parents and p.suffix == ".py" for p in paths)
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(p.relative_to(root).parts) for p in paths)


def test_gsm8k_is_chat_formatted_with_answer_only_loss(tmp_path, tokenizer):
    sub = tmp_path / "gsm.jsonl"
    sub.write_text("".join(DEFAULT_GSM8K.read_text().splitlines(keepends=True)[:3]))
    docs, _ = split_documents([f"gsm8k:{sub}"], val_fraction=0.0)
    assert len(docs) == 3 and all(d.is_chat for d in docs)
    assert [m["role"] for m in docs[0].messages] == ["user", "assistant"]
    ids, mask = pack(docs[:1], tokenizer, seq_len=1024)
    row, m = ids[0].tolist(), mask[0].tolist()
    first_scored = m.index(1)
    prompt = tokenizer.decode(row[:first_scored], skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n") and docs[0].messages[0]["content"] in prompt
    n = sum(m)
    answer = tokenizer.decode(row[first_scored:first_scored + n], skip_special_tokens=False)
    assert answer == docs[0].messages[1]["content"] + IM_END + "\n" + "<|endoftext|>"
    assert set(m[first_scored + n:]) <= {0} and set(row[first_scored + n:]) <= {tokenizer.pad_id}


def test_folder_of_jsonl_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "plain words"}) + "\n"
                                      + json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    (tmp_path / "b.txt").write_text("more words")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    docs, _ = split_documents([str(tmp_path)], val_fraction=0.0)
    assert [(d.is_chat, d.text) for d in docs] == [(False, "plain words"), (True, None), (False, "more words")]


def test_packed_rows_in_memory_mapped_files(tmp_path, tokenizer):
    docs = [Document(f"d{i}", text="To be, or not to be: that is the question. " * (i + 1)) for i in range(6)]
    build_split(tmp_path, "train", docs, tokenizer, seq_len=16)
    split = open_split(tmp_path, "train")
    assert isinstance(split.tokens, np.memmap) and split.tokens.shape[1] == 16 and len(split) > 3
    assert split.loss_mask.min() == 1  # plain text: every token is scored
    stream = np.concatenate([np.asarray(tokenizer.encode(d.text) + [tokenizer.eos_id]) for d in docs])
    assert np.array_equal(np.asarray(split.tokens).reshape(-1), stream[:len(split) * 16])
    stamp = (tmp_path / "train.tokens.bin").stat().st_mtime_ns
    build_split(tmp_path, "train", docs, tokenizer, seq_len=16)  # identical input: kept as is
    assert (tmp_path / "train.tokens.bin").stat().st_mtime_ns == stamp


def test_sample_order_is_a_seeded_permutation_per_epoch(tmp_path, tokenizer):
    docs = [Document("d", text="To be, or not to be: that is the question. " * 20)]
    build_split(tmp_path, "train", docs, tokenizer, seq_len=8)
    split = open_split(tmp_path, "train")
    n = len(split)
    a, b = SampleOrder(split, seed=1), SampleOrder(split, seed=1)
    first = [a.row(k) for k in range(n)]
    assert sorted(first) == list(range(n))
    assert [a.row(k) for k in range(n, 2 * n)] != first  # a new permutation each epoch
    assert [b.row(k) for k in reversed(range(2 * n))] == [a.row(k) for k in reversed(range(2 * n))]
    assert [SampleOrder(split, seed=2).row(k) for k in range(n)] != first
