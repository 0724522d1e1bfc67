"""A fake OpenAI chat endpoint on 127.0.0.1 that answers benchmark items in R1's style.

It recognises an item by finding the item's question text inside the prompt (the dataset is
the answer key), then replies with long-ish `<think>` reasoning and a final answer that is
right or wrong according to `mode`:

  gold   - always the reference answer
  wrong  - always a wrong answer (another letter; gold + 1 for numbers)
  mixed  - right for about two items in three (fixed by a hash of the question), so scores
           are neither 0 nor 100 and identical on every run
and, independently, `fail_rate` of calls fail transiently: 503, 429, or a dropped
connection. `split_reasoning` puts the thinking in `reasoning_content` as vLLM's
deepseek_r1 reasoning parser does. `delay` slows every reply (for kill-and-resume tests).
GET /v1/models lists one model, "fake-r1" (with `max_model_len` where given, as vLLM's card);
with `api_key` every /v1 route wants it as a bearer token (401 otherwise), as a server started
with --api-key. `refuse(item)` a message: that item's requests get a 400 with it (a prompt over the context).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from deepserve.evals.datasets import LETTERS, Item


def _wrong_math(gold: str) -> str:
    m = re.fullmatch(r"-?\d+", gold.strip())
    return str(int(gold) + 1) if m else "-12345"


def _is_right(item: Item, mode: str) -> bool:
    if mode == "gold":
        return True
    if mode == "wrong":
        return False
    digest = hashlib.sha256(item.question.encode()).digest()
    return digest[0] % 3 != 0


def final_answer(task: str, item: Item, right: bool) -> str:
    """The answer part of an R1 reply, in the phrasing each task's prompt asks for."""
    if item.choices:
        letters = LETTERS[:len(item.choices)]
        letter = item.gold if right else letters[(letters.index(item.gold) + 1) % len(letters)]
        if task == "ceval":
            return f"综上所述，正确选项为{letter}。\n\n答案：{letter}"
        return f"Comparing the options, {letter}) fits every condition.\n\n**Answer: {letter}**"
    answer = item.gold if right else _wrong_math(item.gold)
    return (f"Putting the steps together, we get the final value.\n\n"
            f"Therefore, the final answer is $\\boxed{{{answer}}}$.")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that were killed or timed out reset connections; that is expected here


class FakeOpenAI:
    """Start with `with FakeOpenAI(items_by_task, ...) as srv:`; `srv.url` is the server root."""

    def __init__(self, items_by_task: dict[str, list[Item]], mode: str = "gold",
                 fail_rate: float = 0.0, split_reasoning: bool = False, delay: float = 0.0,
                 seed: int = 0, api_key: str | None = None, max_model_len: int | None = None,
                 refuse=None):
        if mode not in ("gold", "wrong", "mixed"):
            raise ValueError(f"mode must be gold, wrong or mixed, got {mode!r}")
        self.items = [(task, item) for task, items in items_by_task.items() for item in items]
        self.mode, self.fail_rate, self.split, self.delay = mode, fail_rate, split_reasoning, delay
        self.api_key, self.max_model_len, self.refuse = api_key, max_model_len, refuse
        self.rng = random.Random(seed)
        self.reply_finish = "stop"   # every reply's finish_reason
        self.lock = threading.Lock()
        self.calls = self.failures = self.answered = 0
        self.requests: list[dict] = []
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def find(self, prompt: str) -> tuple[str, Item]:
        matches = [(task, item) for task, item in self.items if item.question in prompt]
        if not matches:
            raise KeyError(f"no dataset item in prompt {prompt[:80]!r}")
        return max(matches, key=lambda m: len(m[1].question))

    def reply(self, body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        task, item = self.find(prompt)
        thinking = ("Okay, let me work through this carefully. " * 20 +
                    "Wait, maybe A is not right... let me recheck (B) and the units.\n"
                    "Earlier I guessed \\boxed{0} but that was a slip.")
        answer = final_answer(task, item, _is_right(item, self.mode))
        if self.split:
            message = {"role": "assistant", "content": "\n\n" + answer,
                       "reasoning_content": thinking}
        else:
            message = {"role": "assistant", "content": f"{thinking}\n</think>\n\n{answer}"}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": self.reply_finish}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 100,
                          "total_tokens": len(prompt.split()) + 100}}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def refused(self) -> bool:
                """401 without the server's key (when it has one)."""
                if fake.api_key is None or self.headers.get("Authorization") == f"Bearer {fake.api_key}":
                    return False
                self._send(401, {"error": {"message": "invalid or missing API key", "code": "invalid_api_key"}})
                return True

            def do_GET(self):
                if self.refused():
                    return
                if self.path != "/v1/models":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                card = {"id": "fake-r1", "object": "model"}
                if fake.max_model_len is not None:
                    card["max_model_len"] = fake.max_model_len
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.refused():
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with fake.lock:
                    fake.calls += 1
                    fake.requests.append(body)
                    roll = fake.rng.random()
                if roll < fake.fail_rate:
                    with fake.lock:
                        fake.failures += 1
                    kind = int(roll / fake.fail_rate * 3)
                    if kind == 0:
                        self._send(503, {"error": {"message": "overloaded"}})
                    elif kind == 1:
                        self._send(429, {"error": {"message": "slow down"}},
                                   {"Retry-After": "0"})
                    else:  # drop the connection without an answer
                        self.close_connection = True
                        self.connection.shutdown(2)
                    return
                refusal = fake.refuse and fake.refuse(fake.find(body["messages"][-1]["content"])[1])
                if refusal:
                    self._send(400, {"error": {"message": refusal, "type": "BadRequestError", "code": 400}})
                    return
                if fake.delay:
                    time.sleep(fake.delay)
                payload = fake.reply(body)
                with fake.lock:
                    fake.answered += 1
                self._send(200, payload)

        return Handler
