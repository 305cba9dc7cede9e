"""Tokenizer and chat template of a checkpoint folder (`tokenizer.json`, `tokenizer_config.json`)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from models.config import LlamaConfig
from models.errors import CheckpointError, GenerationError

# Used when a checkpoint ships no chat template (documented in the README): ChatML turns.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies are spelled in it), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[chr(b)] = b
        else:
            stand_in[chr(256 + extra)] = b
            extra += 1
    return stand_in


_UNICODE_TO_BYTE = _byte_alphabet()


def _uses_byte_level(tokenizer: HFTokenizer) -> bool:
    """Whether the tokenizer's decoder (or one step of it) is ByteLevel: pieces are byte-alphabet text."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(step.get("type") == "ByteLevel" for step in steps)


TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token")  # set by render_chat


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    """Encode, decode and render chat prompts exactly as the checkpoint's own files say."""

    def __init__(self, tokenizer: HFTokenizer, settings: dict[str, Any], chat_template: str | None,
                 eos_ids: tuple[int, ...]):
        self._tok = tokenizer
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.has_chat_template = chat_template is not None
        self.bos_token = _token_text(settings.get("bos_token"))
        self.eos_token = _token_text(settings.get("eos_token"))
        self.eos_ids = eos_ids
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._byte_level = _uses_byte_level(tokenizer)
        self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                      indent=indent)
        self._template = env.from_string(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def vocabulary(self) -> dict[str, int]:
        """Every token (added ones too) and its id: two tokenizers with the same one agree on ids."""
        return self._tok.get_vocab(with_added_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_with_special(self, ids: list[int]) -> str:
        """Text that re-encodes to the same prompt (special tokens kept), e.g. to hand it to another server."""
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when it holds part of a UTF-8 character (OpenAI chat
        logprobs `bytes`): byte-level BPE pieces map back through GPT-2's byte alphabet,
        sentencepiece byte tokens (<0xE2>) are their byte, '▁' is a space; special tokens their text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._special_ids:
            return piece.encode()
        if self._byte_level and all(ch in _UNICODE_TO_BYTE for ch in piece):
            return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode()

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI `logprobs.tokens` shows it (special tokens included)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None) -> str:
        """Render messages with the chat template, `template_kwargs` as further template variables
        (e.g. Qwen3's enable_thinking; none may be one of those set here); raises GenerationError
        (a 400) on template errors."""
        own = {"messages": messages, "add_generation_prompt": add_generation_prompt,
               "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        try:
            return self._template.render(**(template_kwargs or {}), **own)
        except TemplateError as e:
            raise GenerationError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Template output already holds its special tokens, so none are added (as transformers does)."""
        return self.encode(self.render_chat(messages, template_kwargs=template_kwargs), add_special_tokens=False)


def load_tokenizer(folder: Path, config: LlamaConfig) -> Tokenizer:
    """Load `tokenizer.json` (+ config, chat template); raises CheckpointError naming the file."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer.json is missing (edge-llm needs the fast "
                              "tokenizer file that Hugging Face checkpoints ship)")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from e
    settings: dict[str, Any] = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        settings = json.loads(cfg_path.read_text())
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_path = folder / "chat_template.jinja"
    if template is None and jinja_path.is_file():
        template = jinja_path.read_text()
    eos_ids = list(config.eos_token_ids)
    eos_text = _token_text(settings.get("eos_token"))
    if eos_text is not None and tok.token_to_id(eos_text) is not None:
        eos_ids.append(tok.token_to_id(eos_text))
    return Tokenizer(tok, settings, template, tuple(dict.fromkeys(eos_ids)))
