"""Text <-> token ids: the prompt encoder (chat template) and the incremental detokenizer."""
