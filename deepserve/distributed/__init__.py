"""Process groups and collectives (TP / EP / DP / PP); launchers live beside them.

The package itself imports nothing: `deepserve serve` builds its parser from modules here
(plan, plan_bytes) without importing torch, which parallel_state needs."""
