"""Stage `generate`: Wikipedia sections -> conversational question/answer pairs (paper section 2.2).

    python -m pipeline.generate            # params: generate.*, embeddings.*

Modules: prompts.py (every prompt, versioned), replay.py (the offline demo backend), engine.py (the paper's steps, decided in source order), outputs.py
(files), __main__.py (wiring, price check, budget and MLflow). The client (cache, concurrency,
rate limits, retries, budget, the OpenAI-compatible backend) and the durable response cache
live in pipeline.core (llmclient.py, responsecache.py), shared with the OpenAI arm. Importing
this package imports nothing heavy.
"""
