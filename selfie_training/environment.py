"""The software a result was produced with, recorded in every results file so that a figure can be reproduced."""

import platform
from importlib import metadata


# The packages whose versions can move a figure: the framework, the model code's libraries and the data stack.
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "numpy",
    "pillow",
    "scikit-learn",
)


def package_versions() -> dict[str, str]:
    """Python's version and that of each of `PACKAGES` installed here, e.g. {"python": "3.11.7", "torch": ...}."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
