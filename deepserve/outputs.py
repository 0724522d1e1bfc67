"""vLLM's `vllm.outputs` / `vllm.logprobs` names (deepserve/engine/outputs.py)."""
from deepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput

__all__ = ["CompletionOutput", "Logprob", "RequestOutput"]
