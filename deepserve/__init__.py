"""deepserve: serve, convert, benchmark and evaluate DeepSeek-R1 and its distilled models.

    from deepserve import LLM, SamplingParams
    llm = LLM()                        # the built-in stories260k demo model
    print(llm.generate("Once upon a time", SamplingParams(max_tokens=32))[0].outputs[0].text)
"""
__version__ = "0.1.0"

from deepserve.log import configure_from_env  # noqa: E402

configure_from_env()

from deepserve.config import EngineArgs  # noqa: E402
from deepserve.engine.llm import LLM  # noqa: E402
from deepserve.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from deepserve.engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "EngineArgs", "RequestOutput", "CompletionOutput", "__version__"]
