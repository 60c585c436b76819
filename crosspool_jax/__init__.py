"""crosspool-jax: a JAX serving engine for many cold Mixture-of-Experts LLMs at once.

`LLM` and `SamplingParams` are the Python API; `python -m crosspool_jax.serve` the HTTP
server; `python -m crosspool_jax.batch` JSONL batch generation. See WORKSPACE.md.
"""
import importlib.metadata

from crosspool_jax.lazy_exports import lazy_exports
from crosspool_jax.outputs import CompletionOutput, Logprob, RequestOutput
from crosspool_jax.sampling_params import RequestOutputKind, SamplingParams

try:
    __version__ = importlib.metadata.version("crosspool-jax")
except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob"]


# LLM pulls in JAX and the engine: loaded on first use, so light users (the server's protocol,
# SamplingParams) stay cheap to import
__getattr__ = lazy_exports(__name__, {"LLM": "api"})
