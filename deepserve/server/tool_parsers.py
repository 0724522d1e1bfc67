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
the start of the closing marker. A call whose header is complete is a call, even if the
output ends before its closing marker (cut by max_tokens): the stream has sent its name and
arguments by then, so the whole response has it too, with the arguments as far as they got (as
OpenAI's calls cut by length). A calls block with no complete header stays content.
"""
from __future__ import annotations

import json
import uuid
from typing import Optional

from deepserve.server.reasoning import _held_suffix

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

DEEPSEEK_PARSERS = ("deepseek_v3", "deepseek_v31")
TOOL_PARSERS = DEEPSEEK_PARSERS + ("hermes", "llama3_json")   # the last two: tool_parsers_json.py


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class _Call:
    def __init__(self):
        self.id = tool_call_id()
        self.name: Optional[str] = None
        self.arguments = ""
        self.complete = False


class ToolCallParser:
    """feed(delta) -> (content delta, [tool-call delta]); finish() flushes. A tool-call delta
    is OpenAI's streaming shape: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}.
    A format's parser writes feed(); the flush, the calls and the whole-output parse are shared."""

    def __init__(self):
        self.text = ""
        self.sent = 0              # content chars sent (before the calls)
        self.calls: list[_Call] = []
        self.in_calls = False

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        raise NotImplementedError

    def _content_before(self, delta: str, marker: str) -> str:
        """Take `delta`; return the content it lets out: the text before `marker`, which opens
        the calls (in_calls from then on), less a tail that may be the start of the marker."""
        self.text += delta
        if self.in_calls:
            return ""
        begin = self.text.find(marker)
        self.in_calls = begin >= 0
        upto = begin if self.in_calls else len(self.text) - _held_suffix(self.text, marker)
        content, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return content

    def finish(self) -> tuple[str, list[dict]]:
        """Flush at the end of the output: held-back content, or calls of which no name went out
        (nothing of them was sent as a call), which are content after all."""
        if not self.in_calls:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, []
        if not any(c.name is not None for c in self.calls):
            self.calls = []
            return self.text[self.sent:], []
        return "", []

    def tool_calls(self) -> list[dict]:
        """The calls sent so far as OpenAI's message.tool_calls (a cut call's arguments as far
        as they got)."""
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls if c.name is not None]

    def parse(self, text: str) -> tuple[Optional[str], list[dict]]:
        """A whole output: (content or None, tool_calls)."""
        c1, _ = self.feed(text)
        c2, _ = self.finish()
        content = c1 + c2
        calls = self.tool_calls()
        if calls and not content.strip():   # blanks before the calls are no content (vLLM's)
            content = ""
        return (content or None), calls


class DeepSeekToolParser(ToolCallParser):
    def __init__(self, variant: str = "deepseek_v3"):
        if variant not in DEEPSEEK_PARSERS:
            raise ValueError(f"unknown DeepSeek tool call parser {variant!r}; choose from {', '.join(DEEPSEEK_PARSERS)}")
        super().__init__()
        self.v31 = variant == "deepseek_v31"

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
        content = self._content_before(delta, CALLS_BEGIN)
        return content, (self._calls_deltas() if self.in_calls else [])

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


def make_tool_parser(name: Optional[str]) -> Optional[ToolCallParser]:
    """The --tool-call-parser's incremental parser (None without one)."""
    if name is None:
        return None
    if name in DEEPSEEK_PARSERS:
        return DeepSeekToolParser(name)
    from deepserve.server.tool_parsers_json import json_tool_parser   # it builds on this module
    return json_tool_parser(name)


def tool_calls_tag(variant: str, tools: list, parallel: bool = True, answer: Optional[dict] = None) -> Optional[str]:
    """`tool_choice: auto`'s grammar, an xgrammar structural tag in the `variant` format (R1's
    fenced JSON, V3.1's bare JSON, hermes' or llama3_json's), or None when nothing needs constraining. Once the model
    opens its calls block, each call names one of the tools and its arguments fit that tool's
    parameters schema if it is marked strict (OpenAI's `strict: true`), else any JSON object;
    one call at most when `parallel` is false. Around the calls the text is free; with `answer`
    (response_format's schema) the output is either that JSON answer or text and the calls, so a
    structured answer does not shut the tools out. None (no grammar, as before) when no tool is
    strict and there is no answer format."""
    if answer is None and not any(t.function.strict for t in tools):
        return None
    if variant not in DEEPSEEK_PARSERS:
        from deepserve.server.tool_parsers_json import json_calls_format
        return json.dumps({"type": "structural_tag", "format": json_calls_format(variant, tools, parallel, answer)},
                          ensure_ascii=False)
    calls = []
    for t in tools:
        schema = (t.function.parameters or {"type": "object"}) if t.function.strict else {"type": "object"}
        if variant == "deepseek_v31":
            begin, end = f"{CALL_BEGIN}{t.function.name}{SEP}", CALL_END
        else:
            begin, end = f"{CALL_BEGIN}function{SEP}{t.function.name}\n```json\n", "\n```" + CALL_END
        # a bound on blank runs keeps a model from padding the arguments without end
        calls.append({"type": "tag", "begin": begin, "end": end,
                      "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 16}})
    block = {"type": "tag", "begin": CALLS_BEGIN, "end": CALLS_END,
             "content": {"type": "tags_with_separator", "tags": calls, "separator": "" if variant == "deepseek_v31"
                         else "\n", "at_least_one": True, "stop_after_first": not parallel}}
    if answer is None:   # text with calls blocks anywhere (none at all included)
        fmt = {"type": "triggered_tags", "triggers": [CALLS_BEGIN], "tags": [block], "at_least_one": False,
               "stop_after_first": False}
    else:                # the answer, or text then one calls block
        fmt = {"type": "or", "elements": [{"type": "json_schema", "json_schema": answer, "max_whitespace_cnt": 16},
                                          {"type": "sequence", "elements": [{"type": "any_text"}, block]}]}
    return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)


def required_calls(text: str) -> list[dict]:
    """`tool_choice: required`'s whole output -> OpenAI `tool_calls`: the grammar makes it a JSON
    list `[{"name": NAME, "parameters": {...}}, ...]`. The calls RequiredCallsStream sends for
    the same text: each complete call's parameters re-serialised, and a call that max_tokens cut
    short after its name with its parameters' text as far as it got (the stream has sent those)."""
    stream = RequiredCallsStream()
    stream.feed(text)
    calls = []
    for call in stream.calls:
        if not call["sent"]:
            continue
        arguments = call["args"]
        if call["done"]:
            try:
                arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
            except json.JSONDecodeError:   # not held to the grammar (it always is when served)
                pass
        calls.append({"id": tool_call_id(), "type": "function",
                      "function": {"name": call["name"], "arguments": arguments}})
    return calls


class RequiredCallsStream:
    """`tool_choice: required` streamed: the grammar makes the output a JSON list
    `[{"name": NAME, "parameters": {...}}, ...]`; each call's header goes out once its name
    string is complete, then the raw text of its parameters value as it grows. Joined, a
    call's argument deltas are the parameters' JSON text as generated (the whole response
    re-serialises them: the same value, possibly other whitespace)."""

    def __init__(self):
        self.text = ""
        self.pos = 0
        self.depth = 0            # 1: inside the list, 2: inside a call's object
        self.in_string = self.escaped = False
        self.token = ""           # the string being read at depth 2 (a key or the name)
        self.key: Optional[str] = None
        self.expect = "key"       # at depth 2: "key", "colon", "value", "comma"
        self.calls: list[dict] = []   # per call: name, id, sent (header out), args (raw), done (args whole)
        self.args_start: Optional[int] = None
        self.args_sent = 0

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        out: list[dict] = []
        while self.pos < len(self.text):
            self._step(self.text[self.pos], out)
            self.pos += 1
        if self.args_start is not None:  # the parameters read so far, once the name is out
            self._send_args(self.text[self.args_start:self.pos], out)
        return out

    def _send_args(self, raw: str, out: list[dict]) -> None:
        call = self.calls[-1]
        call["args"] = raw
        if call["sent"] and len(raw) > self.args_sent:
            out.append({"index": len(self.calls) - 1, "function": {"arguments": raw[self.args_sent:]}})
            self.args_sent = len(raw)

    def _header(self, out: list[dict]) -> None:
        call = self.calls[-1]
        if call["sent"] or call["name"] is None:
            return
        call["sent"] = True
        out.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}})
        self.args_sent = 0

    def _step(self, ch: str, out: list[dict]) -> None:
        if self.in_string:
            if self.depth == 2 and self.args_start is None:
                self.token += ch
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 2 and self.args_start is None:
                    self._string_done(out)
            return
        if self.depth == 2 and self.args_start is None and self.expect == "value" and self.key == "parameters" \
                and not ch.isspace():
            self.args_start = self.pos
        if ch == '"':
            self.in_string = True
            if self.depth == 2 and self.args_start is None:
                self.token = ch
            return
        if ch in "[{":
            self.depth += 1
            if self.depth == 2 and ch == "{":
                self.calls.append({"name": None, "id": tool_call_id(), "sent": False, "args": "", "done": False})
                self.key, self.expect = None, "key"
        elif ch in "]}":
            self.depth -= 1
            if self.depth == 2 and self.args_start is not None:   # the parameters object closed
                self._end_args(self.pos + 1, out)
            elif self.depth == 1 and self.args_start is not None:  # a bare parameters value closed by }
                self._end_args(self.pos, out)
        elif ch == ":" and self.depth == 2 and self.args_start is None:
            self.expect = "value"
        elif ch == "," and self.depth == 2:
            if self.args_start is not None:                        # a bare parameters value ended
                self._end_args(self.pos, out)
            self.key, self.expect = None, "key"

    def _string_done(self, out: list[dict]) -> None:
        value = json.loads(self.token)
        if self.expect == "key":
            self.key, self.expect = value, "colon"
        elif self.expect == "value":
            if self.key == "name":
                self.calls[-1]["name"] = value
                self._header(out)
                if self.calls[-1]["args"]:     # parameters came first: send them now
                    self._send_args(self.calls[-1]["args"], out)
            self.expect = "comma"

    def _end_args(self, end: int, out: list[dict]) -> None:
        self._send_args(self.text[self.args_start:end].rstrip(), out)
        self.calls[-1]["done"] = True
        self.args_start = None
        self.expect = "comma"
