"""LLM Camp: a large language model's whole chain, from raw text to agents, built from scratch in notebooks"""

__version__ = "0.1.0"
