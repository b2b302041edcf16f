"""The upstream backend: generations forwarded to an OpenAI-compatible engine (vLLM, SGLang)."""
