"""`tridlm chat MODEL`: an interactive conversation, streamed, in any decoding mode.

Each line read from stdin is a user turn; the prompt is the whole conversation rendered with the
tokenizer's chat template (or, without one, "User: ...\\nAssistant:" lines). Commands: /reset
forgets the conversation, /exit (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys

from .generate import add_generation_args, generation_params, load_model, summary

# tokens that end an assistant turn in common chat templates
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat interactively with a model", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--stats", action="store_true", help="print the metrics of each reply to stderr")
    p.set_defaults(func=run, max_new_tokens=256)


def render(tokenizer, messages: list[dict]) -> str:
    if tokenizer is not None and tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def run(args) -> int:
    from tridlm.generate import generate

    params = generation_params(args)
    model = load_model(args, params)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer: chat needs one")
    templated = bool(tok.chat_template)
    params["stop_token_ids"] = tuple(i for i in (tok.token_to_id(t) for t in END_OF_TURN)
                                     if i is not None and i != model.config.mask_token_id)
    if not templated:
        params["stop"] = tuple(params["stop"]) + ("\nUser:",)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = render(tok, messages)
        # forget the oldest turns rather than overflow the context window
        while (len(tok.encode(prompt)) >= model.config.max_position_embeddings
               and len(messages) > len(system) + 1):
            del messages[len(system):len(system) + 2]
            prompt = render(tok, messages)
        stream = generate(model, prompt, args.mode, stream=True, add_special_tokens=not templated, **params)
        for chunk in stream:
            print(chunk, end="", flush=True)
        print(flush=True)
        reply = stream.result.text.strip()
        messages.append({"role": "assistant", "content": reply})
        if args.stats:
            print(summary(stream.result), file=sys.stderr)
    return 0
