"""Optional dependencies: imported where they are needed, refused by name where they are missing.

``import visionlora`` needs torch and safetensors only. The model zoos, diffusers, accelerate and
the recipe tools are extras (``pyproject.toml``); code that needs one calls :func:`require`, so a
missing package is one :class:`~visionlora.MissingDependencyError` that names it and the extra
that installs it, never a traceback from deep inside a call.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from visionlora.errors import MissingDependencyError

__all__ = ["EXTRAS", "require"]

EXTRAS: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "diffusion"),
    "transformers": ("transformers", "diffusion"),
    "torchvision": ("torchvision", "train"),
    "timm": ("timm", "train"),
    "accelerate": ("accelerate", "train"),
    "yaml": ("pyyaml", "train"),
    "matplotlib": ("matplotlib", "train"),
    "tqdm": ("tqdm", "train"),
    "sklearn": ("scikit-learn", "train"),
    "PIL": ("pillow", "train"),
    "bitsandbytes": ("bitsandbytes", "bnb"),
}
"""Import name -> (pip package, visionlora extra that installs it). ``train`` includes ``diffusion``."""


def require(module: str) -> ModuleType:
    """Import ``module`` (a dotted name such as ``"diffusers.loaders"``) and return it.

    Raises:
        MissingDependencyError: the package (or one it needs) is not installed; the message names
            the pip package and the ``pip install 'visionlora[<extra>]'`` that installs it.

    Example:
        >>> diffusers = require("diffusers")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in EXTRAS:  # the package asked for, or an optional one it imports itself
            problem = "which is not installed"
        else:  # an installed package that fails to import: say how
            missing, problem = module.split(".")[0], f"which does not import ({exc})"
        package, extra = EXTRAS.get(missing, (missing, "train"))
        raise MissingDependencyError(
            f"this needs the Python package {package!r}, {problem}; install it with: "
            f"pip install 'visionlora[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
        ) from None
