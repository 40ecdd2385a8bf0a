"""KVQ Studio's web UI (gradio). A room of its own: it calls ``kvcache`` and ``calib``; they never import it."""

from .page import build_demo
from .state import AppState, SessionState, UserError

__all__ = ["AppState", "SessionState", "UserError", "build_demo"]
