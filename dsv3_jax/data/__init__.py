"""Text in, token rows out: sources, tokenizers, the prepare step that writes token shards, and the grain pipeline."""
