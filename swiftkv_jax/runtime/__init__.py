"""Running the model: the paged KV cache and its prefix index, sampling, the jitted device steps,
generate() for one batch, and the serving engine (request checks, handle, scheduler, engine)."""
