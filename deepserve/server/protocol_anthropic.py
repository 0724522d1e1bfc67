"""The wire protocol of POST /v1/messages, Anthropic's Messages API as vLLM serves it
(vllm/entrypoints/anthropic): the request models and their conversion to a chat-completions
request, so the chat path (template, parsers, sampling checks) serves it.

The conversion follows vLLM's: the top-level `system` (a string or text blocks, Claude Code's
per-request `x-anthropic-billing-header` block left out so the prefix cache holds) becomes a
system message; a user's `tool_result` blocks become `tool` messages, an assistant's `tool_use`
blocks its tool_calls and its `thinking` blocks its reasoning; tools become function tools and
tool_choice auto / any / tool / none chat's auto / required / named / none. A final assistant
message is a prefill the reply continues (Anthropic's rule; vLLM opens a new turn). Blocks that
carry what a text-only server cannot read (images, documents) and server tools are a 400 naming
them.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import Field

from deepserve.server.errors import APIError
from deepserve.server.protocol import _Wire

# Claude Code's system block carrying a per-request hash: left out of the prompt (vLLM's)
_BILLING_HEADER = "x-anthropic-billing-header"


class Block(_Wire):
    """A content block: text, tool_use, tool_result, thinking, redacted_thinking (and what is refused)."""

    type: str
    text: Optional[str] = None
    id: Optional[str] = None
    name: Optional[str] = None
    input: Optional[dict[str, Any]] = None
    tool_use_id: Optional[str] = None
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    is_error: Optional[bool] = None
    thinking: Optional[str] = None
    signature: Optional[str] = None
    data: Optional[str] = None
    source: Optional[dict[str, Any]] = None
    cache_control: Optional[dict[str, Any]] = None   # a prompt-caching hint: the prefix cache needs none
    citations: Optional[Any] = None


class Message(_Wire):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class Tool(_Wire):
    name: str
    description: Optional[str] = None
    input_schema: Optional[dict[str, Any]] = None
    type: Optional[str] = None   # "custom" (a client tool); Anthropic's server tools have versioned types
    strict: Optional[bool] = None
    cache_control: Optional[dict[str, Any]] = None


class ToolChoice(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None


class OutputFormat(_Wire):
    type: Literal["json_schema"] = "json_schema"
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")


class OutputConfig(_Wire):
    effort: Optional[Literal["low", "medium", "high", "xhigh", "max"]] = None
    format: Optional[OutputFormat] = None


class CountTokensRequest(_Wire):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: Optional[Union[str, list[Block]]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None   # vLLM's

    def chat_request(self) -> dict:
        """The chat-completions body that renders the same prompt."""
        body: dict[str, Any] = {"model": self.model, "messages": self._chat_messages()}
        if self.chat_template_kwargs is not None:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        if self.tools:
            body["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(self.tools)]
        choice = self.tool_choice
        if choice is not None:
            body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                                   else {"auto": "auto", "any": "required", "none": "none"}[choice.type])
            if choice.type == "tool" and not choice.name:
                raise APIError(400, "tool_choice.name is required when type is 'tool'", param="tool_choice.name")
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        return body

    def _chat_messages(self) -> list[dict]:
        out: list[dict] = []
        blocks = [] if isinstance(self.system, str) else self.system or []
        bad = next((i for i, b in enumerate(blocks) if b.type != "text"), None)
        if bad is not None:   # Anthropic's system takes text blocks alone
            raise APIError(400, f"system[{bad}]: block type {blocks[bad].type!r} is not supported (text only)",
                           param=f"system[{bad}].type")
        system = self.system if isinstance(self.system, str) else "".join(
            b.text or "" for b in blocks if not (b.text or "").startswith(_BILLING_HEADER))
        if system:
            out.append({"role": "system", "content": system})
        for i, msg in enumerate(self.messages):
            if isinstance(msg.content, str):
                out.append({"role": msg.role, "content": msg.content})
                continue
            texts, calls, reasoning = [], [], []
            for j, block in enumerate(msg.content):
                where = f"messages[{i}].content[{j}]"
                if block.type == "text":
                    texts.append(block.text or "")
                elif block.type == "thinking" and msg.role == "assistant":
                    reasoning.append(block.thinking or "")
                elif block.type == "redacted_thinking" and msg.role == "assistant":
                    continue   # opaque: nothing a template could show
                elif block.type == "tool_use" and msg.role == "assistant":
                    calls.append({"id": block.id or "", "type": "function",
                                  "function": {"name": block.name or "", "arguments": json.dumps(block.input or {})}})
                elif block.type == "tool_result" and msg.role == "user":
                    out.append({"role": "tool", "tool_call_id": block.tool_use_id or "",
                                "content": _result_text(block, where)})
                else:
                    raise APIError(400, f"{where}: block type {block.type!r} is not supported in a {msg.role} "
                                        "message (this server reads text, and tool_use / thinking from the "
                                        "assistant, tool_result from the user)", param=f"{where}.type")
            if not (texts or calls or reasoning):
                continue
            chat: dict[str, Any] = {"role": msg.role, "content": "".join(texts) if texts else None}
            if calls:
                chat["tool_calls"] = calls
            if reasoning:
                chat["reasoning"] = "".join(reasoning)
            if chat["content"] is None and not calls:
                chat["content"] = ""
            out.append(chat)
        return out


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    metadata: Optional[dict[str, Any]] = None
    output_config: Optional[OutputConfig] = None

    def chat_request(self) -> dict:
        body = super().chat_request()
        body.update(max_tokens=self.max_tokens, stream=self.stream)
        last = body["messages"][-1] if body["messages"] else {}
        if last.get("role") == "assistant" and not last.get("tool_calls"):
            # Anthropic's prefill: the reply continues the final assistant message (its text is not repeated)
            body.update(add_generation_prompt=False, continue_final_message=True)
        for name, chat_name in (("stop_sequences", "stop"), ("temperature", "temperature"), ("top_p", "top_p"),
                                ("top_k", "top_k")):
            if getattr(self, name) is not None:
                body[chat_name] = getattr(self, name)
        user = (self.metadata or {}).get("user_id")
        if user is not None:
            body["user"] = str(user)
        config = self.output_config
        if config is not None and config.effort is not None:
            body["reasoning_effort"] = config.effort
        if config is not None and config.format is not None:
            if config.format.schema_ is None:
                raise APIError(400, "output_config.format needs a schema", param="output_config.format.schema")
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "json_schema", "schema": config.format.schema_}}
        return body


def _chat_tool(tool: Tool, i: int) -> dict:
    if tool.type not in (None, "custom"):   # web_search_20250305, bash_20250124, ...: run by Anthropic's servers
        raise APIError(400, f"tools[{i}]: tool type {tool.type!r} is not supported (this server runs no tools: "
                            "client tools with an input_schema only)", param=f"tools[{i}].type")
    if tool.input_schema is None:
        raise APIError(400, f"tools[{i}] needs an input_schema", param=f"tools[{i}].input_schema")
    schema = {"type": "object", **tool.input_schema}   # vLLM's default type
    function: dict[str, Any] = {"name": tool.name, "parameters": schema}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _result_text(block: Block, where: str) -> str:
    """A tool_result's content as text: a string, or its text blocks joined by newlines (vLLM's)."""
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    texts = []
    for k, item in enumerate(block.content):
        if item.get("type") != "text":
            raise APIError(400, f"{where}.content[{k}]: block type {item.get('type')!r} is not supported in a "
                                "tool_result (text only)", param=f"{where}.content[{k}].type")
        texts.append(item.get("text") or "")
    return "\n".join(texts)
