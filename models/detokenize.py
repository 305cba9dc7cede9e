"""Incremental detokenization with stop strings that may span token boundaries."""

from __future__ import annotations

from models.tokenizer import Tokenizer

_CONTEXT = 4  # prompt tokens decoded in front of the output, so leading spaces come out right


class IncrementalText:
    """Turns generated ids into text deltas; holds back text that may still become a stop string.

    Each token decodes a short window, not the whole output: the tokens since the last text was
    released and the few before them (for a leading space, or the rest of a character split
    across byte tokens), as text-generation-inference and vLLM do. Decoding everything each time
    made a request's detokenizing quadratic in its length.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...]):
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT:])  # the prompt's tail, then every generated id
        self._prefix = 0  # the window [prefix, read) was decoded before: its text is context
        self._read = len(self._ids)  # ids from here on have not produced text yet
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all text decided so far (never contains a stop string)
        self._emitted = 0
        self.stopped = False

    def _fresh_text(self) -> str:
        """The text the ids past `_read` add, or "" while they end inside a character."""
        before = self._tok.decode(self._ids[self._prefix:self._read])
        window = self._tok.decode(self._ids[self._prefix:])
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""  # an incomplete UTF-8 sequence (or nothing visible yet): wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(before):]

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now final. Sets `stopped` on a stop string."""
        self._ids.append(token_id)
        fresh = self._fresh_text()
        if not fresh:
            return ""
        searched = max(0, len(self.text) - self._longest_stop + 1)  # a stop string ending in the new text
        text = self.text + fresh
        hit = self._first_stop(text, searched)
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

    def _first_stop(self, text: str, start: int) -> int | None:
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
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
