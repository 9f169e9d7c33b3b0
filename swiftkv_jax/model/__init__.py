"""The (SwiftKV) Llama: the weights schema and Params (params.py), layers, attention, where K/V go
(kv_access.py), SwiftKV's upper segment and its initialisation, and the forward pass (forward.py).
Pure functions over a params pytree and an explicit KV-cache pytree; nothing here knows how the
runtime schedules requests or caches prefixes."""
