"""Build torchvision classifiers, load checkpoints safely, find the target layer and the CAM head."""

from audit.models.anatomy import Anatomy, CamHead, FeatureLayout, find_cam_head, inspect_model
from audit.models.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    build_model,
    classification_architectures,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Anatomy",
    "CamHead",
    "FeatureLayout",
    "Checkpoint",
    "build_model",
    "classification_architectures",
    "find_cam_head",
    "inspect_model",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
