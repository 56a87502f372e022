"""A corpus of the model's own greedy answers (tridlm.training.self_generated): prompts that are not
benchmark prompts, records the trainer reads, greedy answers equal to AR mode's, and resumable writing."""

import json

import pytest
from conftest import tiny_text_model

from tridlm.bench.prompts import STORY_OPENINGS, humaneval_prompts
from tridlm.training.corpora import SourceFile, read_documents
from tridlm.training.self_generated import code_prompts, mixed_prompts, story_prompts, write_corpus

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompts_are_seeded_and_not_benchmark_prompts(tmp_path):
    stories = story_prompts(40, seed=3)
    assert stories == story_prompts(40, seed=3) and stories != story_prompts(40, seed=4)
    assert not {p.text for p in stories} & set(STORY_OPENINGS)
    assert {p.chat for p in stories} == {True, False}
    code = code_prompts(20, seed=0)
    assert len(code) == 20 and all(p.text.lstrip().startswith(("def ", "@")) for p in code)
    assert all(p.text.rstrip().endswith(('"""', "'''")) for p in code)  # cut right after the docstring
    assert not {p.text for p in code} & {p.text for p in humaneval_prompts()}
    gsm = tmp_path / "train.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": "#### 1"}) + "\n" for i in range(3)))
    mixed = mixed_prompts(3, 1, 2, gsm8k_path=gsm)
    assert [p.id.split("/")[0] for p in mixed] == ["gsm8k", "code", "story", "gsm8k", "story", "gsm8k"]


def test_corpus_answers_are_the_models_greedy_ar_and_resume(tmp_path):
    from tridlm.bench.hf_baseline import to_transformers

    model = tiny_text_model()
    tok = model.tokenizer
    prompts = [p for p in story_prompts(6, seed=0) if not p.chat][:3]
    out = tmp_path / "self.jsonl"
    hf = to_transformers(model)
    first = write_corpus(hf, tok, prompts[:2], out, max_new_tokens=6, batch_size=2, log=lambda m: None)
    second = write_corpus(hf, tok, prompts, out, max_new_tokens=6, batch_size=2, log=lambda m: None)
    assert (first["records"], second["records"], second["skipped"]) == (2, 1, 2)
    docs = read_documents(SourceFile(str(out), out, "jsonl"))
    assert len(docs) == 3 and all(not d.is_chat for d in docs)
    for p, d in zip(prompts, docs, strict=True):
        ar = model.generate(p.text, mode="ar", max_new_tokens=6, add_special_tokens=False)
        assert d.text == p.text + tok.decode([i for i in ar.rows[0].ids if i != tok.eos_id])
