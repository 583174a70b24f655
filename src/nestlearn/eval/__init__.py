"""Evaluation: perplexity and bits per byte, the run report (zero-shot, NIAH, MQAR later)."""
