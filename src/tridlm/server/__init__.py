"""OpenAI-compatible HTTP serving over the `tridlm.engine` (see `app.create_app`)."""

from ..engine import EngineConfig
from .app import ServerConfig, create_app
from .prompts import Limits
from .thread import ServerThread

__all__ = ["EngineConfig", "Limits", "ServerConfig", "ServerThread", "create_app"]
