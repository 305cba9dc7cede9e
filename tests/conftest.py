import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default `make-model` tiny checkpoint, made once per test session."""
    from models.factory import make_model

    return make_model(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def qwen3_style_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny checkpoint with a chat template in the style of Qwen3's (templates/qwen3_style.jinja),
    which reads `enable_thinking` from the caller's template arguments."""
    import json

    folder = tmp_path_factory.mktemp("qwen3-style")
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = (Path(__file__).parent / "templates" / "qwen3_style.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder
