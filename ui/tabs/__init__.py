"""The page's tabs, one module each: layout and wiring only; what the buttons do lives in ``ui.handlers``."""

GPU = "gpu"  # one queue for the model work that is not chat (load, calibrate, evaluate)
CHAT = "chat"  # chat turns of many sessions run at once: the batch worker decodes them together
CHAT_SESSIONS = 16  # chat turns in flight at once, across sessions
