"""Incremental detokenization with stop strings that may span token boundaries."""

from __future__ import annotations

from models.tokenizer import Tokenizer

_CONTEXT = 4  # prompt tokens decoded in front of the output, so leading spaces come out right


class IncrementalText:
    """Turns generated ids into text deltas; holds back text that may still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...]):
        self._tok = tokenizer
        self._prefix_ids = prompt_ids[-_CONTEXT:]
        self._prefix_text = tokenizer.decode(self._prefix_ids)
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self.text = ""  # all text decided so far (never contains a stop string)
        self._emitted = 0
        self.stopped = False

    def _decode_output(self) -> str:
        full = self._tok.decode(self._prefix_ids + self._ids)
        if full.startswith(self._prefix_text):
            return full[len(self._prefix_text):]
        return self._tok.decode(self._ids)

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now final. Sets `stopped` on a stop string."""
        self._ids.append(token_id)
        text = self._decode_output()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        hit = self._first_stop(text)
        if hit is not None:
            self.stopped, text = True, text[:hit]
        self.text = text
        safe = len(text) if self.stopped else len(text) - self._held_back(text)
        delta = text[self._emitted:max(safe, self._emitted)]
        self._emitted += len(delta)
        return delta

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
