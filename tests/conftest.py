import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default `make-model` tiny checkpoint, made once per test session."""
    from models.factory import make_model

    return make_model(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)
