"""The backbone: loading (default GGUF -> cached safetensors, any local HF dir) and its adapter."""

from server.model.backbone import Backbone, UnsupportedModelError
from server.model.loading import ModelLoadError, load_backbone, load_training_backbone

__all__ = [
    "Backbone",
    "ModelLoadError",
    "UnsupportedModelError",
    "load_backbone",
    "load_training_backbone",
]
