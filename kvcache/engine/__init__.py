"""Serving: sequences, the scheduler that batches them, the worker thread, chat sessions."""
