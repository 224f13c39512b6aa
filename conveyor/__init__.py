"""conveyor: a continuous-batching LLM inference engine and OpenAI-compatible server."""

from conveyor.sampling_params import SamplingParams
from conveyor.structured.params import StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import conveyor` (and the pure-Python core) does not pull in torch.
    if name == "LLM":
        from conveyor.engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from conveyor.engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
