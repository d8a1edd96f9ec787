"""Fun-Audio-Chat: a from-scratch PyTorch implementation of the Fun-Audio-Chat voice LLM."""

__version__ = "0.1.0"
