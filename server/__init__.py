"""lks-server: one resident LLM backbone, hot-swappable LKS edit packs per request."""

__version__ = "0.1.0"
