"""convert: a checkpoint from elsewhere → a checkpoint folder this tool loads with no config."""

from __future__ import annotations

import click

from .options import model_config_option, out_dir_option


@click.command()
@click.argument("weights", metavar="CKPT", type=click.Path(path_type=str))
@model_config_option
@out_dir_option("Checkpoint folder to write (model.safetensors + config.json).", required=True)
def convert(weights, model_config, out_dir):
    """Convert a checkpoint (a Lightning .ckpt, a torchvision ViT, DINOv2, renamed keys: see the config's
    `checkpoint:` rules) into a checkpoint folder that `--model` loads directly; prints how the keys mapped.

    \b
    Example:
      medvit-explain convert epoch=3.ckpt --model-config lightning_vit.yaml --out runs/converted
      medvit-explain explain scan.nii.gz --model runs/converted
    """
    from ..model import load_model, save_checkpoint
    from ..model.checkpoint import key_map

    lines = key_map(weights, model_config)
    model = load_model(weights, device="cpu", config=model_config)
    path = save_checkpoint(model, out_dir, provenance={"converted_from": str(weights)})
    for line in lines:
        click.echo(f"  {line}")
    n = sum(1 for _ in model.state_dict())
    click.echo(
        f"{n} tensors loaded into {model.config.get('name', 'the model')} ({model.num_targets} targets); wrote {path}"
    )
