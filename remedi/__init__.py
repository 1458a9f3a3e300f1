"""remedi: locate and edit the factual knowledge stored inside causal language models."""

__version__ = "0.1.0"
