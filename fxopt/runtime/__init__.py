"""fxopt.runtime: generation with static caches (HF GPTNeoX, HF Mamba) and CUDA-graph replay.

* :func:`generate` / :func:`cache_bytes` for an :class:`fxopt.OptimizedModule`
  (:mod:`fxopt.runtime.engine`);
* :class:`CacheSpec` / :class:`CacheEntry`: what a generation graph's cache holds, recorded in
  the graph module's meta and changeable by passes (:mod:`fxopt.runtime.cache_spec`);
* :class:`GraphReplay`: CUDA-graph replay of a callable's specialisations
  (:mod:`fxopt.runtime.cuda_graphs`).
"""
from .cache_spec import CACHE_SPEC_KEY, CacheEntry, CacheSpec, CacheSpecError, RecordCacheSpec, cache_spec_of, replace_cache_inputs, set_cache_spec
from .cuda_graphs import GraphReplay
from .family import UnsupportedModelError
from .engine import GenerateError, cache_bytes, cache_length, generate, report
from .guards import ModelGuard
from .sampling import UNSET, GenerationConfigError

__all__ = [
    "generate", "cache_bytes", "cache_length", "report", "GraphReplay", "ModelGuard",
    "CacheSpec", "CacheEntry", "CACHE_SPEC_KEY", "RecordCacheSpec", "cache_spec_of", "set_cache_spec",
    "replace_cache_inputs", "CacheSpecError", "UNSET", "UnsupportedModelError", "GenerateError", "GenerationConfigError",
]
