"""Where K/V live: the model's KV shape, the block layout every part agrees on, and the pool of blocks."""
