"""An OpenAI-compatible server that runs a contextlab method per request (``contextlab serve``)."""

from contextlab.serve.app import create_app
from contextlab.serve.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
