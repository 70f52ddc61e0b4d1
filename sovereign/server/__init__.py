"""HTTP API: the FastAPI app and its OpenAI-compatible routes."""
