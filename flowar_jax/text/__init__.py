"""Frozen text encoders for text-conditional generation: prompts -> token states and a pooled vector."""
