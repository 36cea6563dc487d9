"""Stage `generate`: Wikipedia sections -> conversational question/answer pairs (paper section 2.2).

    python -m pipeline.generate            # params: generate.*, embeddings.*

Modules: prompts.py (every prompt, versioned), client.py (cache, concurrency, rate limits,
retries, the OpenAI-compatible backend), cache.py (durable response cache), replay.py (the
offline demo backend), engine.py (the paper's steps, decided in source order), outputs.py
(files), __main__.py (wiring and MLflow). Importing this package imports nothing heavy.
"""
