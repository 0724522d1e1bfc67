"""Tool-call parsers: the model's tool-call tokens in its text -> OpenAI `tool_calls`.

DeepSeek-V3 / R1 (`--tool-call-parser deepseek_v3`; R1's chat template writes the same):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

DeepSeek-V3.1 (`deepseek_v31`): `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"arg": 1}<｜tool▁call▁end｜>`.

One incremental state machine serves streamed and whole outputs alike (as the reasoning
parser does): text before `<｜tool▁calls▁begin｜>` is content; each call's name is sent once
its header is complete, then its arguments as they grow, holding back any tail that may be
the start of the closing marker. An output whose calls block holds no complete call is
left as content (vLLM's behaviour for malformed calls).
"""
from __future__ import annotations

import uuid
from typing import Optional

from deepserve.server.reasoning import _held_suffix

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

TOOL_PARSERS = ("deepseek_v3", "deepseek_v31")


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class _Call:
    def __init__(self):
        self.id = tool_call_id()
        self.name: Optional[str] = None
        self.arguments = ""
        self.complete = False


class DeepSeekToolParser:
    """feed(delta) -> (content delta, [tool-call delta]); finish() flushes. A tool-call delta
    is OpenAI's streaming shape: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}."""

    def __init__(self, variant: str = "deepseek_v3"):
        if variant not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {variant!r}; choose from {', '.join(TOOL_PARSERS)}")
        self.v31 = variant == "deepseek_v31"
        self.text = ""
        self.sent = 0              # content chars sent (before the calls block)
        self.calls: list[_Call] = []
        self.in_calls = False

    # the arguments of one call end with this
    @property
    def _closing(self) -> str:
        return CALL_END if self.v31 else "\n```" + CALL_END

    def _header(self, seg: str) -> Optional[tuple[str, int]]:
        """(name, where the arguments start) once a call's header is complete."""
        sep = seg.find(SEP)
        if sep < 0:
            return None
        if self.v31:
            return seg[:sep].strip(), sep + len(SEP)
        rest = seg[sep + len(SEP):]
        opening = rest.find("\n```json\n")
        if opening < 0:
            return None
        return rest[:opening].strip(), sep + len(SEP) + opening + len("\n```json\n")

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        if not self.in_calls:
            begin = self.text.find(CALLS_BEGIN)
            if begin < 0:
                upto = len(self.text) - _held_suffix(self.text, CALLS_BEGIN)
                content, self.sent = self.text[self.sent:upto], max(self.sent, upto)
                return content, []
            self.in_calls = True
            content, self.sent = self.text[self.sent:begin], begin
            return content, self._calls_deltas()
        return "", self._calls_deltas()

    def _calls_deltas(self) -> list[dict]:
        block = self.text[self.sent + len(CALLS_BEGIN):]
        deltas = []
        for i, seg in enumerate(block.split(CALL_BEGIN)[1:]):
            if i == len(self.calls):
                self.calls.append(_Call())
            call = self.calls[i]
            if call.complete:
                continue
            header = self._header(seg)
            if header is None:
                break
            name, start = header
            args = seg[start:]
            end = args.find(self._closing)
            if end >= 0:
                args, call.complete = args[:end], True
            else:
                args = args[:len(args) - _held_suffix(args, self._closing)]
            delta: dict = {"index": i, "function": {}}
            if call.name is None:
                call.name = name
                delta.update(id=call.id, type="function")
                delta["function"]["name"] = name
            if len(args) > len(call.arguments):
                delta["function"]["arguments"] = args[len(call.arguments):]
                call.arguments = args
            elif "name" in delta["function"]:
                delta["function"]["arguments"] = ""
            if delta["function"]:
                deltas.append(delta)
            if not call.complete:
                break
        return deltas

    def finish(self) -> tuple[str, list[dict]]:
        """Flush at the end of the output: held-back content, or a calls block with no
        complete call, which is content after all."""
        if not self.in_calls:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, []
        if not any(c.complete for c in self.calls):
            self.calls = []
            return self.text[self.sent:], []
        return "", []

    def tool_calls(self) -> list[dict]:
        """The complete calls as OpenAI's message.tool_calls."""
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls if c.complete]

    def parse(self, text: str) -> tuple[Optional[str], list[dict]]:
        """A whole output: (content or None, tool_calls)."""
        c1, _ = self.feed(text)
        c2, _ = self.finish()
        content = c1 + c2
        calls = self.tool_calls()
        if calls:
            content = content.rstrip()
        return (content or None), calls


def make_tool_parser(name: Optional[str]) -> Optional[DeepSeekToolParser]:
    return DeepSeekToolParser(name) if name is not None else None
