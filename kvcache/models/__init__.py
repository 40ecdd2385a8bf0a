"""Loading chat models: the embedded GGUF, GGUF files, Hugging Face folders or Hub ids, InternLM checkpoints."""
