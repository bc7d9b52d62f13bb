"""itscale: inference-time scaling for LLMs as probabilistic inference."""

__version__ = "0.1.0"
