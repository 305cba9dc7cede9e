"""A request's sampling fields (OpenAI's, and vLLM's extensions) -> models.sampling.SamplingParams."""

from __future__ import annotations

from models.sampling import SamplingParams
from scheduler.errors import ApiError
from scheduler.fields import in_range, typed, valid_text

MAX_STOP = 4
MAX_BIASED = 300  # logit_bias entries and stop_token_ids a request may give (OpenAI's limit for the first)


def sampling_params(body: dict, chat: bool, max_tokens: int, n: int) -> tuple[SamplingParams, bool]:
    """The body's sampling fields, validated, and whether the request wants logprobs; raises ApiError(400).
    `n`: the choices per prompt (seeds seed..seed + n - 1 must fit 64 bits)."""
    temperature = float(typed(body, "temperature", (int, float), 1.0))
    in_range("temperature", temperature, 0.0, 2.0)
    top_p = float(typed(body, "top_p", (int, float), 1.0))
    in_range("top_p", top_p, 1e-9, 1.0)
    if chat:
        want_logprobs = typed(body, "logprobs", bool, False)
        top = typed(body, "top_logprobs", int, 0)
        in_range("top_logprobs", top, 0, 20)
    else:
        want_logprobs = body.get("logprobs") is not None
        top = typed(body, "logprobs", int, 0)
        in_range("logprobs", top, 0, 5)
    top_k = typed(body, "top_k", int, 0)
    in_range("top_k", top_k, -1, 1 << 20)
    penalties = {key: float(typed(body, key, (int, float), 0.0))
                 for key in ("presence_penalty", "frequency_penalty")}
    for key, value in penalties.items():
        in_range(key, value, -2.0, 2.0)
    for key, low, high, default in (("repetition_penalty", 0.01, 10.0, 1.0), ("min_p", 0.0, 1.0, 0.0)):
        penalties[key] = float(typed(body, key, (int, float), default))  # vLLM's extensions
        in_range(key, penalties[key], low, high)
    seed = typed(body, "seed", int, None)
    if seed is not None:  # a prompt's choice j samples with seed + j: every one must fit a 64-bit seed
        in_range("seed", seed, -(1 << 63), (1 << 63) - n)
    penalties |= {"logit_bias": _logit_bias(body), "extra_stop_ids": _token_ids(body, "stop_token_ids")}
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=max(top_k, 0), seed=seed, stop=_stop(body),
                            ignore_eos=typed(body, "ignore_eos", bool, False), logprobs=top,
                            keep_logprob=want_logprobs, **penalties)
    return params, want_logprobs


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP} strings", param="stop")
    return tuple(valid_text(s, "stop") for s in stops)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {"token id": bias in -100..100}, at most MAX_BIASED tokens."""
    raw = typed(body, "logit_bias", dict, {})
    if len(raw) > MAX_BIASED:
        raise ApiError(400, f"'logit_bias' may bias at most {MAX_BIASED} tokens, got {len(raw)}", param="logit_bias")
    biases = []
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdigit()) or isinstance(value, bool) or not isinstance(value, int | float):
            raise ApiError(400, "'logit_bias' maps token ids (as strings) to numbers, e.g. {\"50256\": -100}",
                           param="logit_bias")
        in_range("logit_bias", float(value), -100.0, 100.0)
        biases.append((int(key), float(value)))
    return tuple(biases)


def _token_ids(body: dict, key: str) -> tuple[int, ...]:
    """A list of token ids (vLLM's `stop_token_ids`), at most MAX_BIASED of them."""
    ids = typed(body, key, list, [])
    if len(ids) > MAX_BIASED or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ApiError(400, f"'{key}' must be a list of at most {MAX_BIASED} token ids", param=key)
    return tuple(ids)
