"""A thin wrapper over `tokenizers`: text <-> ids, special ids (the mask and the FIM sentinels), and the
chat template."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

MASK_TOKEN = "<|mask|>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None):
        self.hf = tokenizer
        self._plain = threading.Lock()  # encode_text flips the shared tokenizer's special-token parsing
        self.config = dict(config or {})
        self.chat_template: str | None = self.config.get("chat_template")
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.pad_id = self._special_id("pad_token")
        self.mask_id = self._special_id("mask_token")
        if self.mask_id is None:
            self.mask_id = self.hf.token_to_id(MASK_TOKEN)

    def _special_id(self, key: str) -> int | None:
        tok = self.config.get(key)
        if isinstance(tok, dict):  # {"content": "<s>", ...}
            tok = tok.get("content")
        return self.hf.token_to_id(tok) if tok else None

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            config = json.loads(tc.read_text())
        template = path / "chat_template.jinja"
        if template.is_file() and "chat_template" not in config:
            config["chat_template"] = template.read_text()
        return cls(_HFTokenizer.from_file(str(tj)), config)

    def save(self, path) -> None:
        path = Path(path)
        self.hf.save(str(path / "tokenizer.json"))
        cfg = dict(self.config)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    # -- text <-> ids ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                             "or chat_template.jinja); pass a plain prompt instead")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        tpl = env.from_string(self.chat_template)
        special = {k: (v.get("content") if isinstance(v, dict) else v)
                   for k, v in self.config.items() if k.endswith("_token")}
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat template's ids with each message's content encoded as plain text: a special-token
        string typed inside a message (`<|im_end|><|im_start|>system`) stays text, so no turn is forged."""
        marks = [f"\x00content-{i}\x00" for i in range(len(messages))]
        text = self.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks, strict=True)],
                                        add_generation_prompt)
        if any(text.count(k) != 1 for k in marks):  # the template rewrites content: only plain text is safe
            for m in messages:
                hit = next((t for t in self.special_strings() if t in str(m.get("content", ""))), None)
                if hit is not None:
                    raise ValueError(f"a message holds the special token {hit!r}; remove it")
            return self.encode(self.apply_chat_template(messages, add_generation_prompt))
        ids: list[int] = []
        for m, k in zip(messages, marks, strict=True):
            before, text = text.split(k, 1)
            ids += self.encode(before)
            ids += self.encode_text(str(m.get("content", "")))
        return ids + self.encode(text)

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text` with special-token strings in it encoded as the characters they are."""
        with self._plain:
            self.hf.encode_special_tokens = True
            try:
                return self.hf.encode(text, add_special_tokens=add_special_tokens).ids
            finally:
                self.hf.encode_special_tokens = False

    def special_strings(self) -> list[str]:
        return [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int


def fim_tokens(tokenizer) -> FimTokens | None:
    """The FIM sentinel ids of a tokenizer, or None when it lacks any of them (not trained for FIM)."""
    if tokenizer is None:
        return None
    ids = [tokenizer.token_to_id(t) for t in FIM_TOKENS]
    return None if any(i is None for i in ids) else FimTokens(*ids)


def add_fim_tokens(tokenizer) -> FimTokens:
    """Add the FIM sentinels to a `tridlm.Tokenizer` as special tokens (at the end of its vocabulary)."""
    missing = [t for t in FIM_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        extra = list(tokenizer.config.get("additional_special_tokens") or [])
        tokenizer.config["additional_special_tokens"] = extra + [t for t in missing if t not in extra]
    return fim_tokens(tokenizer)
