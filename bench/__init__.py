"""Benchmarks: fleet against vLLM's own server, LiteLLM, and the offline engine (see docs/benchmarks.md)."""
