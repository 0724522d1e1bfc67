"""vLLM's `vllm.sampling_params` names (deepserve/engine/sampling_params.py and beam_search.py)."""
from deepserve.engine.beam_search import BeamSearchParams
from deepserve.engine.sampling_params import (GuidedDecoding, RequestOutputKind, SamplingParams, SamplingType,
                                              StructuredOutputsParams)

__all__ = ["BeamSearchParams", "GuidedDecoding", "RequestOutputKind", "SamplingParams", "SamplingType",
           "StructuredOutputsParams"]
