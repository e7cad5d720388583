"""Maintenance tools that write files the server ships (run from the repository root)."""
