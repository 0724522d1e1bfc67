"""deepserve: serve, convert, benchmark and evaluate DeepSeek-R1 and its distilled models.

    from deepserve import LLM, SamplingParams
    llm = LLM()                        # the built-in stories260k demo model
    print(llm.generate("Once upon a time", SamplingParams(max_tokens=32))[0].outputs[0].text)
"""
__version__ = "0.1.0"

from deepserve.log import configure_from_env  # noqa: E402

configure_from_env()

# vLLM's top-level names (`from vllm import ...`) that deepserve has
_EXPORTS = {"LLM": "deepserve.engine.llm", "SamplingParams": "deepserve.engine.sampling_params",
            "EngineArgs": "deepserve.config", "RequestOutput": "deepserve.engine.outputs",
            "CompletionOutput": "deepserve.engine.outputs", "BeamSearchParams": "deepserve.engine.beam_search",
            "LLMEngine": "deepserve.engine.llm_engine", "PromptType": "deepserve.inputs",
            "TextPrompt": "deepserve.inputs", "TokensPrompt": "deepserve.inputs"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deepserve' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
