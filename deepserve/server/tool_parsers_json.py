"""JSON tool-call parsers for the distilled models' base formats, vLLM's `hermes` (Qwen2.5's calls;
R1-Distill-Qwen's tokenizer keeps its tags) and `llama3_json` (Llama 3.1's; R1-Distill-Llama's):

    hermes        Let me check.<tool_call>
                  {"name": "get_weather", "arguments": {"city": "Paris"}}
                  </tool_call>
    llama3_json   {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "add", ...}
                  (after an optional <|python_tag|>, a special token the detokenizer drops)

The models' own templates list no tools, so these come with a --chat-template that does
(vLLM's examples/tool_chat_template_hermes.jinja, tool_chat_template_llama3.1_json.jinja).

Same interface and rules as tool_parsers.DeepSeekToolParser, for streamed and whole outputs
alike: feed(delta) -> (content delta, [tool-call delta]); a call's name goes out once its JSON
string is whole, then the JSON text of its arguments as it grows (the text as written, so the
deltas joined equal the whole response's arguments); a call cut short keeps its arguments as
far as they got. Text after the calls is dropped (vLLM's). hermes: text before the first
<tool_call> is content, and calls of which no name completed stay content. llama3_json (vLLM's
streaming rule): the output is calls when it opens with a JSON object whose first key is
"name", "parameters" or "arguments", otherwise all content.
"""
from __future__ import annotations

import json
from typing import Optional

from deepserve.server.reasoning import _held_suffix
from deepserve.server.tool_parsers import ToolCallParser, _Call

HERMES_BEGIN, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()
_BLANK = " \t\n\r"


def _skip_blank(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _BLANK:
        pos += 1
    return pos


class ScannedCall:
    """One call object's text `{"name": NAME, KEY: VALUE, ...}` read as far as it goes: its first
    key and name once whole, the JSON text of its arguments (KEY: one of `args_keys`) so far,
    and where the object ends (None while it is open)."""

    def __init__(self, text: str, start: int, args_keys: tuple[str, ...]):
        self.first_key: Optional[str] = None
        self.name: Optional[str] = None
        self.arguments: Optional[str] = None
        self.end: Optional[int] = None
        pos = _skip_blank(text, start + 1)   # text[start] is "{"
        while pos < len(text) and text[pos] != "}":
            try:
                key, pos = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError:     # cut inside the key (or not JSON)
                return
            pos = _skip_blank(text, pos)
            if not isinstance(key, str) or pos >= len(text) or text[pos] != ":":
                return
            if self.first_key is None:
                self.first_key = key
            value_start = pos = _skip_blank(text, pos + 1)
            try:
                value, pos = _DECODER.raw_decode(text, pos)
                after = _skip_blank(text, pos)
                whole = after < len(text)    # something follows it: a number may not go on
            except json.JSONDecodeError:
                value, whole = None, False
            if key in args_keys:   # trailing blanks may be followed by more of the value
                self.arguments = text[value_start:pos] if whole else text[value_start:].rstrip(_BLANK)
            if not whole:
                return
            if key == "name" and isinstance(value, str):
                self.name = value
            pos = after
            if text[pos] != ",":
                break
            pos = _skip_blank(text, pos + 1)
        if pos < len(text) and text[pos] == "}":
            self.end = pos + 1


class _JsonCallsParser(ToolCallParser):
    """What both formats share: the calls' deltas from their scans."""

    args_keys: tuple[str, ...] = ("arguments",)

    def _deltas(self, scans: list[ScannedCall]) -> list[dict]:
        """The tool-call deltas that `scans` (the calls as they stand) add to what was sent."""
        deltas = []
        for i, scan in enumerate(scans):
            if i == len(self.calls):
                self.calls.append(_Call())
            call = self.calls[i]
            if call.name is None and scan.name is None:
                break        # its name first: the calls after it wait
            delta: dict = {"index": i, "function": {}}
            if call.name is None:
                call.name = scan.name
                delta.update(id=call.id, type="function")
                delta["function"].update(name=call.name, arguments="")
            arguments = scan.arguments or ""
            if len(arguments) > len(call.arguments):
                delta["function"]["arguments"] = arguments[len(call.arguments):]
                call.arguments = arguments
            if delta["function"]:
                deltas.append(delta)
        return deltas


class HermesToolParser(_JsonCallsParser):
    def feed(self, delta: str) -> tuple[str, list[dict]]:
        content = self._content_before(delta, HERMES_BEGIN)
        return content, (self._deltas(self._scans()) if self.in_calls else [])

    def _scans(self) -> list[ScannedCall]:
        scans = []
        for part in self.text[self.sent:].split(HERMES_BEGIN)[1:]:
            end = part.find(HERMES_END)
            body = part[:end] if end >= 0 else part[:len(part) - _held_suffix(part, HERMES_END)]
            start = _skip_blank(body, 0)
            if start >= len(body) or body[start] != "{":
                break
            scans.append(ScannedCall(body, start, self.args_keys))
            if end < 0:
                break
        return scans


class Llama3JsonToolParser(_JsonCallsParser):
    args_keys = ("parameters", "arguments")

    def __init__(self):
        super().__init__()
        self.decided = False     # whether the output is calls (in_calls) or content is known

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        if not self.decided:
            start = self._calls_start()
            if start is None:
                return "", []    # the opening still arriving
            self.decided = True
            if start < 0:
                return super().finish()   # the content so far
            self.in_calls = True
        if not self.in_calls:
            content, self.sent = self.text[self.sent:], len(self.text)
            return content, []
        return "", self._deltas(self._scans())

    def _calls_start(self) -> Optional[int]:
        """Where the first call object opens; -1 when the output is not calls; None while it
        cannot tell yet."""
        pos = _skip_blank(self.text, 0)
        if self.text.startswith(PYTHON_TAG, pos):
            pos = _skip_blank(self.text, pos + len(PYTHON_TAG))
        elif PYTHON_TAG.startswith(self.text[pos:]):
            return None
        if pos >= len(self.text):
            return None
        if self.text[pos] != "{":
            return -1
        scan = ScannedCall(self.text, pos, self.args_keys)
        if scan.first_key is None:
            return -1 if scan.end is not None else None
        return pos if scan.first_key in ("name",) + self.args_keys else -1

    def _scans(self) -> list[ScannedCall]:
        scans, pos = [], self._calls_start()
        while pos is not None and pos < len(self.text) and self.text[pos] == "{":
            scans.append(ScannedCall(self.text, pos, self.args_keys))
            if scans[-1].end is None:
                break
            pos = scans[-1].end
            while pos < len(self.text) and self.text[pos] in _BLANK + ";":
                pos += 1
        return scans

    def finish(self) -> tuple[str, list[dict]]:
        self.decided = True    # an output still undecided never opened with a call
        return super().finish()


def json_tool_parser(name: str) -> _JsonCallsParser:
    return {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}[name]()


def json_calls_format(variant: str, tools: list, parallel: bool, answer: Optional[dict]) -> dict:
    """tool_parsers.tool_calls_tag's structural-tag format in the hermes or llama3_json shape."""
    calls = []
    for t in tools:
        schema = (t.function.parameters or {"type": "object"}) if t.function.strict else {"type": "object"}
        name = json.dumps(t.function.name, ensure_ascii=False)
        if variant == "hermes":
            begin, end = f'{HERMES_BEGIN}\n{{"name": {name}, "arguments": ', "}\n" + HERMES_END
        else:
            begin, end = f'{{"name": {name}, "parameters": ', "}"
        calls.append({"type": "tag", "begin": begin, "end": end,
                      "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 16}})
    trigger = HERMES_BEGIN if variant == "hermes" else '{"name": '
    if answer is None:   # text with calls anywhere (none at all included)
        return {"type": "triggered_tags", "triggers": [trigger], "tags": calls, "at_least_one": False,
                "stop_after_first": not parallel}
    block = {"type": "tags_with_separator", "tags": calls, "separator": "\n" if variant == "hermes" else "; ",
             "at_least_one": True, "stop_after_first": not parallel}
    calls_output = {"type": "sequence", "elements": [{"type": "any_text"}, block]} if variant == "hermes" else block
    return {"type": "or", "elements": [{"type": "json_schema", "json_schema": answer, "max_whitespace_cnt": 16},
                                       calls_output]}
