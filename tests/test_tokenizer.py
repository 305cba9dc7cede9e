"""Chat templates and stop strings that span token boundaries."""

import json

import pytest
import transformers

from models.config import load_config
from models.detokenize import IncrementalText
from models.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld?"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again"}]


def test_chat_template_renders_like_transformers(tiny_model):
    ours = load_tokenizer(tiny_model, load_config(tiny_model))
    ref = transformers.AutoTokenizer.from_pretrained(tiny_model)
    expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(MESSAGES) == expected
    ref_ids = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ref_ids = ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids
    assert ours.encode_chat(MESSAGES) == list(ref_ids)


TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}, {"role": "user", "content": "3+3?"}]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_a_qwen3_style_template_renders_like_transformers(qwen3_style_model, kwargs):
    """Namespaces, reversed loops, string methods, and template arguments (`chat_template_kwargs`)."""
    ours = load_tokenizer(qwen3_style_model, load_config(qwen3_style_model))
    ref = transformers.AutoTokenizer.from_pretrained(qwen3_style_model)
    expected = ref.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True, **kwargs)
    assert ours.render_chat(TURNS, template_kwargs=kwargs) == expected
    assert ("<think>\n\n</think>" in expected) is (kwargs.get("enable_thinking") is False)
    assert "add them" not in expected  # an earlier turn's reasoning is dropped by the template


def test_encode_decode_like_transformers(tiny_model):
    ours = load_tokenizer(tiny_model, load_config(tiny_model))
    ref = transformers.AutoTokenizer.from_pretrained(tiny_model)
    text = "def main():\n    return 'naïve café' + str(42)"
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text


def test_missing_template_uses_documented_default(tiny_model, tmp_path):
    for f in tiny_model.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path, load_config(tmp_path))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and not tok.has_chat_template
    assert tok.render_chat([{"role": "user", "content": "x"}]) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def _stream(tok, text: str, stop: tuple[str, ...]):
    ids = tok.encode(text, add_special_tokens=False)
    inc = IncrementalText(tok, [0], stop)
    deltas = []
    for t in ids:
        deltas.append(inc.add(t))
        if inc.stopped:
            break
    deltas.append(inc.flush())
    return ids, deltas, inc


@pytest.mark.parametrize("stop", ["o, wo", "lo, w", "orld!"])
def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tiny_model, stop):
    tok = load_tokenizer(tiny_model, load_config(tiny_model))
    text = "Hello, world! And more text after it."
    ids, deltas, inc = _stream(tok, text, (stop,))
    pieces = [tok.decode([t]) for t in ids]
    assert not any(stop in p for p in pieces), "the stop string must span a token boundary"
    assert inc.stopped
    assert "".join(deltas) == text[: text.index(stop)]


def test_text_that_only_looks_like_a_stop_prefix_is_released(tiny_model):
    tok = load_tokenizer(tiny_model, load_config(tiny_model))
    text = "Hello, wonderful world"
    _, deltas, inc = _stream(tok, text, ("o, wx",))
    assert not inc.stopped and "".join(deltas) == text


class CountingTokenizer:
    """A tokenizer that records how many ids each decode call was given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tok.decode(ids)


def test_streamed_text_is_the_whole_decode_and_each_token_decodes_a_short_window(tiny_model):
    tok = load_tokenizer(tiny_model, load_config(tiny_model))
    text = "Naïve café, déjà vu: 42 × 7 = 294.\n  Indented line; ünïcödé.  " * 40
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    counting = CountingTokenizer(tok)
    inc = IncrementalText(counting, prompt, ())
    streamed = "".join(inc.add(t) for t in ids) + inc.flush()
    assert streamed == tok.decode(prompt[-4:] + ids)[len(tok.decode(prompt[-4:])):]
    assert len(ids) > 500 and max(counting.sizes) <= 12  # not the whole output, however long it grows
