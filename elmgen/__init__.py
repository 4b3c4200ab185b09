"""elmgen: language models for image generation (ELM, arXiv 2410.16257)."""

__version__ = "0.1.0"
