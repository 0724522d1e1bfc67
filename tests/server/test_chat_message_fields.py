"""A chat reply's message carries vLLM 0.26's `reasoning` field, null where the server runs no
reasoning parser (vLLM's ChatMessage always has it): clients read `message.reasoning`, which
the openai SDK answers with an AttributeError where the key is missing."""
from __future__ import annotations

import httpx
import openai

from conftest import API_KEY


def test_reasoning_is_null_without_a_parser(demo_server):
    client = openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "Once"}],
                                       max_tokens=3, temperature=0)
    assert r.choices[0].message.reasoning is None
    raw = httpx.post(demo_server.v1 + "/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": "stories260k", "messages": [{"role": "user", "content": "Once"}],
                           "max_tokens": 3, "temperature": 0}, timeout=60).json()
    message = raw["choices"][0]["message"]
    assert "reasoning" in message and message["reasoning"] is None and "reasoning_content" not in message
