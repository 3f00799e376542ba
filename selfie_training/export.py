"""The body of `export_timm.py`: the ResNet of a Selfie checkpoint written as a timm state dict in safetensors."""

import logging
import os
from dataclasses import dataclass, field

from safetensors import SafetensorError

from .checkpoints import load_checkpoint, load_selfie_config, saved_model_class
from .errors import UserError
from .runner import parse_arguments
from .timm_weights import save_timm_weights, timm_modules


logger = logging.getLogger(__name__)


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={"help": "A Selfie checkpoint: pretraining, or a classifier."})
    output_file: str = field(metadata={"help": "The .safetensors file to write, outside the checkpoint's folder."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_file where it exists."})


def main(args: list[str] | None = None) -> str:
    (export_args,) = parse_arguments((ExportArguments,), args)
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    path, output_file = export_args.model_name_or_path, export_args.output_file
    if not output_file.endswith(".safetensors"):
        raise UserError(f"--output_file {output_file} must end in .safetensors: timm reads the format from the name.")
    check_output_file(output_file, path, export_args.overwrite)
    config = load_selfie_config(path, "--model_name_or_path")
    # A classifier holds stage 4 and the classifier; any other checkpoint's ResNet is P, in its base model.
    model = load_checkpoint(saved_model_class(config), path, config=config)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        save_timm_weights(model, output_file)
    except (OSError, SafetensorError) as error:
        raise UserError(f"--output_file {output_file}: cannot write it ({error}).") from error
    parts = ", ".join(
        prefix.rstrip(".") or "conv1, bn1, layer1-3" for prefix in timm_modules(model, with_classifier=True)
    )
    logger.info("Wrote the timm %s weights (%s, %s stem) to %s.", config.backbone, parts, config.stem, output_file)
    return output_file


def check_output_file(output_file: str, checkpoint: str, overwrite: bool):
    """Never write into the checkpoint's folder (its model.safetensors would become timm's names, which a Selfie
    model cannot load), and replace an existing file only with --overwrite."""
    if os.path.isdir(checkpoint):
        folder, output = os.path.realpath(checkpoint), os.path.realpath(output_file)
        if os.path.commonpath([folder, output]) == folder:
            raise UserError(
                f"--output_file {output_file} is inside the checkpoint --model_name_or_path {checkpoint}: write it elsewhere."
            )
    if os.path.lexists(output_file) and not overwrite:
        raise UserError(f"--output_file {output_file} exists: add --overwrite to replace it.")
