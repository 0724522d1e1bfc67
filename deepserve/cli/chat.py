"""`deepserve chat`: an interactive chat in the terminal, streaming tokens as they come.

Each turn is rendered with the model's chat template (or --chat-template) over the whole
conversation so far. Type `exit` or send EOF (Ctrl-D) to leave; Ctrl-C stops a reply.
"""
from __future__ import annotations

import argparse
import sys

from deepserve.cli.generate import add_sampling_args, engine_from_args, sampling_params_from_args
from deepserve.config import EngineArgs


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="Chat with a model in the terminal (streams tokens).",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default=None, help="System prompt.")
    p.add_argument("--chat-template", default=None, help="Chat template file replacing the tokenizer's.")
    add_sampling_args(p, max_tokens=512)
    EngineArgs.add_cli_args(p.add_argument_group("engine (vLLM flag names)"))
    p.set_defaults(func=run)


def stream_reply(engine, prompt_ids: list[int], params, out=None) -> str:
    """Run one request, writing text deltas to `out` (sys.stdout as it is when called) as they
    come; returns the whole text."""
    out = sys.stdout if out is None else out
    request_id = engine.add_request(None, {"prompt_token_ids": prompt_ids}, params)
    shown = 0
    text = ""
    try:
        while engine.has_unfinished_requests():
            for res in engine.step():
                if res.request_id != request_id:
                    continue
                text = res.outputs[0].text
                out.write(text[shown:])
                out.flush()
                shown = len(text)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
    return text


def run(args: argparse.Namespace) -> int:
    from deepserve.server.api_server import read_chat_template

    # a --chat-template path that is no file fails before the model loads
    template = read_chat_template(args.chat_template) if args.chat_template else None
    engine = engine_from_args(args, "chat with")
    if template is not None:
        engine.tokenizer.chat_template = template
    if not engine.tokenizer.chat_template:
        raise ValueError("this model has no chat template; pass --chat-template FILE")
    params = sampling_params_from_args(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)
        limit = engine.max_model_len - len(prompt_ids)
        if limit < 1:
            print(f"[the conversation ({len(prompt_ids)} tokens) fills the context of "
                  f"{engine.max_model_len}; start a new chat]")
            break
        params.max_tokens = min(args.max_tokens, limit)
        reply = stream_reply(engine, prompt_ids, params)
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0
