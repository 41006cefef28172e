"""Model side of medvit-explain: task spec, timm ViT + task head, checkpoints, devices."""

from medvit_explain.model.adapters import wrap_model
from medvit_explain.model.checkpoint import (
    SAMPLE_MODEL_DIR,
    checkpoint_config,
    load_config,
    load_model,
    read_state_dict,
    save_checkpoint,
)
from medvit_explain.model.device import resolve_device
from medvit_explain.model.keymaps import monai_vit_keys, torchvision_vit_keys
from medvit_explain.model.network import FORMAT, MedViT, build_backbone, build_model
from medvit_explain.model.preprocessing import (
    DEFAULT_PREPROCESSING,
    default_preprocessing,
    validate_preprocessing,
)
from medvit_explain.model.task import Target, TaskSpec, load_task_spec

__all__ = [
    "DEFAULT_PREPROCESSING",
    "FORMAT",
    "MedViT",
    "SAMPLE_MODEL_DIR",
    "Target",
    "TaskSpec",
    "build_backbone",
    "build_model",
    "checkpoint_config",
    "default_preprocessing",
    "load_config",
    "load_model",
    "load_task_spec",
    "monai_vit_keys",
    "torchvision_vit_keys",
    "read_state_dict",
    "resolve_device",
    "save_checkpoint",
    "validate_preprocessing",
    "wrap_model",
]
