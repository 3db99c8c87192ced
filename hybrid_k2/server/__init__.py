"""`hybrid-k2 serve`: an OpenAI-compatible HTTP server (chat/completions, tools, streaming, constrained JSON)."""
from .app import Server, create_app, serve

__all__ = ["Server", "create_app", "serve"]
