"""The transformers glue: a ``Cache`` over the block pool and the ``kvq`` attention that reads it."""
