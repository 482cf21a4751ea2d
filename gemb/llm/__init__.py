"""LLMs for the data-quality stages: gemb's own Gemma 3 decoder (decoder.py)."""
