"""Benchmarks: `bench serve` / `sweep` measure any OpenAI-compatible server over HTTP (ours
or anyone's), `bench latency` / `throughput` the engine in-process; vLLM bench's flags and
result field names throughout."""
