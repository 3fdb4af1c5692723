"""Tiny offline fixtures shared by tests/ and bench/: a byte-level tokenizer / Qwen3-VL processor directory
(`tokenizer`) and a seeded tiny diffusers QwenImage21Pipeline with our directory layout (`pipeline`). torch,
diffusers and transformers are imported inside the functions (test-only dependencies)."""
