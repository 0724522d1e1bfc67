"""`deepserve chat`: an interactive chat in the terminal, streaming tokens as they come.

    deepserve chat [--model FOLDER] [--system-prompt S] [-q MESSAGE]     # a local model
    deepserve chat --url http://host:8000/v1 [--model-name M] [--api-key K] [-q MESSAGE]

With --url (or --model-name / --api-key, whose server is then vLLM's default
http://localhost:8000/v1) it is vLLM's `vllm chat`: a client of a running server. Otherwise the
model runs here, each turn rendered with its chat template (or --chat-template) over the whole
conversation so far. -q sends one message, prints the answer and exits. Type `exit` or send EOF
(Ctrl-D) or Ctrl-C at the prompt to leave; Ctrl-C stops a local reply, and ends a client session.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from deepserve.cli.generate import add_sampling_args, engine_from_args, sampling_params_from_args, utf8_text
from deepserve.cli.main import UserError
from deepserve.cli.remote import DEFAULT_URL, add_query_args, run_chat
from deepserve.config import EngineArgs

LOCAL_MAX_TOKENS = 512


def register(subparsers) -> None:
    # "resolve": -q is vLLM chat's --quick here, which leaves --quantization its long name only
    p = subparsers.add_parser("chat", help="Chat with a model in the terminal (streams tokens).",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              conflict_handler="resolve")
    p.add_argument("--system-prompt", "--system", dest="system_prompt", default=None, help="System prompt.")
    p.add_argument("--chat-template", default=None, help="Chat template file replacing the tokenizer's.")
    add_query_args(p.add_argument_group("client of a running server (vLLM's `vllm chat`)"), url_default=None)
    add_sampling_args(p, max_tokens=LOCAL_MAX_TOKENS)
    EngineArgs.add_cli_args(p.add_argument_group("engine (vLLM flag names)"))
    p.add_argument("-q", "--quick", default=None, metavar="MESSAGE",
                   help="Send one message, print the answer and exit.")
    # the server's own max_tokens unless --max-tokens is given, as vLLM's client
    p.set_defaults(func=run, max_tokens=None)


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
    if args.url is not None or args.model_name is not None or args.api_key is not None:
        local = next((f.name for f in dataclasses.fields(EngineArgs)
                      if hasattr(args, f.name) and getattr(args, f.name) != _default(f)), None)
        if local is not None:
            flag = "--" + local.replace("_", "-")
            raise UserError(f"{flag} sets up a local model, which a client of a server (--url, --model-name, "
                            f"--api-key) does not run" + ("; name the server's model with --model-name"
                                                         if local == "model" else ""))
        args.url = args.url or DEFAULT_URL
        return run_chat(args)
    return run_local(args)


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _user_messages(quick: str | None):
    """The user's messages: -q's one, else each line of stdin until EOF, Ctrl-C or `exit`."""
    if quick is not None:
        yield utf8_text(quick, "-q")
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:   # Ctrl-C at the prompt ends the chat, as EOF does
            line = ""
        if not line and interactive:
            print()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield utf8_text(line.rstrip("\n"), "stdin")


def run_local(args: argparse.Namespace) -> int:
    from deepserve.server.api_server import read_chat_template

    system = utf8_text(args.system_prompt, "--system-prompt") if args.system_prompt else None
    # a --chat-template path that is no file fails before the model loads
    template = read_chat_template(args.chat_template) if args.chat_template else None
    engine = engine_from_args(args, "chat with")
    if template is not None:
        engine.tokenizer.chat_template = template
    if not engine.tokenizer.chat_template:
        raise ValueError("this model has no chat template; pass --chat-template FILE")
    max_tokens = args.max_tokens = LOCAL_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    params = sampling_params_from_args(args)
    messages = [{"role": "system", "content": system}] if system else []
    for message in _user_messages(args.quick):
        messages.append({"role": "user", "content": message})
        prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)
        limit = engine.max_model_len - len(prompt_ids)
        if limit < 1:
            print(f"[the conversation ({len(prompt_ids)} tokens) fills the context of "
                  f"{engine.max_model_len}; start a new chat]")
            break
        params.max_tokens = min(max_tokens, limit)
        reply = stream_reply(engine, prompt_ids, params)
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0
