"""Prompt sets: built-ins, a user's JSONL, interleaving, and GSM8K answer checking."""

import pytest

from tridlm.bench.prompts import extract_answer, is_correct, load_prompts


def test_built_in_sets():
    g = load_prompts("gsm8k", 3)
    assert [p.kind for p in g] == ["gsm8k"] * 3 and g[0].answer == "18" and g[0].chat
    h = load_prompts("humaneval", 2)
    assert h[0].id == "HumanEval/0" and "def has_close_elements" in h[0].text and not h[0].chat
    assert len(load_prompts("humaneval")) == 164
    assert load_prompts("stories", 1)[0].text.startswith("Once upon a time")


def test_mixed_interleaves_and_truncates():
    m = load_prompts("mixed", 5)
    assert [p.kind for p in m] == ["gsm8k", "humaneval", "story", "gsm8k", "humaneval"]
    assert [p.kind for p in load_prompts("stories,gsm8k", 3)] == ["story", "gsm8k", "story"]
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("poems")


def test_counts_per_set():
    ps = load_prompts("gsm8k:3,humaneval:1,stories:2")
    assert [p.kind for p in ps] == ["gsm8k", "humaneval", "story", "gsm8k", "gsm8k", "story"]
    assert [p.id for p in ps if p.kind == "gsm8k"] == [p.id for p in load_prompts("gsm8k", 3)]
    for bad in ("gsm8k:0", "gsm8k:x", "gsm8k:-2"):
        with pytest.raises(ValueError, match="positive whole number"):
            load_prompts(bad)


def test_user_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hello", "id": "a"}\n\n{"question": "2+2?", "answer": 4, "chat": true, "kind": "gsm8k"}\n')
    ps = load_prompts(str(f))
    got = [(p.id, p.text, p.answer, p.chat) for p in ps]
    assert got == [("a", "Hello", None, False), ("user/1", "2+2?", "4", True)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(str(bad))


def test_gsm8k_answers():
    assert extract_answer("... so she makes $18 a day. The answer is 18.") == "18"
    assert extract_answer("#### 1,200") == "1200"
    assert extract_answer("first 3 then 7.50") == "7.5"
    assert extract_answer("no numbers") is None
    assert is_correct("The answer is $70,000.", "70000") and not is_correct("The answer is 7.", "70")


def test_render_without_chat_template():
    class Plain:
        chat_template = None

        def encode(self, text):
            return [len(text)]

    g = load_prompts("gsm8k", 1)[0]
    assert g.render(Plain()).startswith("Question: Solve") and g.render(Plain()).endswith("\nAnswer:")
