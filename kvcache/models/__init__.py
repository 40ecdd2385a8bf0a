"""Loading chat models from local files: the embedded GGUF, GGUF files, Hugging Face folders, InternLM checkpoints."""
