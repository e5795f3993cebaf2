"""fleet: one OpenAI-compatible endpoint for a fleet of vLLM models, described in one fleet.toml."""

__version__ = "0.1.0"
