"""Loopback fakes of external services (only the LLM API is ever faked; see openai_server.py)."""
