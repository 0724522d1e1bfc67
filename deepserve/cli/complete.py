"""`deepserve complete`: vLLM's `vllm complete`, text completions from a running server.

    deepserve complete [--url http://localhost:8000/v1] [--model-name M] [--api-key K] [-q PROMPT]

Streams each answer as it comes. Without -q each line typed after "> " is one prompt, until EOF.
The local model's one-shot form is `deepserve generate --prompt TEXT`.
"""
from __future__ import annotations

import argparse

from deepserve.cli.remote import DEFAULT_URL, add_query_args, run_complete


def register(subparsers) -> None:
    p = subparsers.add_parser("complete", help="Complete prompts via a running server (streams tokens).",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_query_args(p, url_default=DEFAULT_URL)
    p.add_argument("--max-tokens", type=int, default=None, help="Tokens to generate (default: the server's).")
    p.add_argument("-q", "--quick", default=None, metavar="PROMPT",
                   help="Send one prompt, print the completion and exit.")
    p.set_defaults(func=run_complete)
