"""Model building blocks: parallel-aware linears and embeddings, norms, rotary, attention, MoE."""
