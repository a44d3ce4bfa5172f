"""LLM Camp: a large language model's whole chain, from raw text to agents, built from scratch in notebooks

Modules:

- `course_lib.engine`: A paged KV cache with continuous batching and prefix caching, in the manner of vLLM and nano-vllm, small enough to read.
- `course_lib.serve`: An OpenAI-compatible HTTP server over the paged engine of `course_lib.engine`."""

__version__ = "0.1.0"
