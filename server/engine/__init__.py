"""Turning prompts into tokens on the resident backbone."""
