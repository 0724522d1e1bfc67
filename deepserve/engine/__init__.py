"""The engine: offline `LLM`, `AsyncLLM` for the server, scheduler, KV blocks, model runner."""
