"""LLMs for the data-quality stages: one interface (interface.py: LLM, make_llm), gemb's own
Gemma 3 decoder in process (decoder.py), an OpenAI-compatible server as a client (http.py) and
`gemb llm serve` (server.py)."""
