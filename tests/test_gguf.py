"""GGUF checkpoints: SmolLM2 (the default model) and files written here as llama.cpp writes them,
imported and served on 1-3 devices, against transformers loading the same GGUF (dequantized, float32)."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from cluster_proc import ClusterProcess
from gguf_writer import write_gguf
from hf_reference import make_hf_checkpoint
from test_cluster import complete
from tokenizers import Tokenizer

from models import vnni_kernels
from models.config import load_config
from models.default_model import default_gguf
from models.detokenize import IncrementalText
from models.model import LocalModel
from models.tokenizer import load_tokenizer

Q = gguf.GGMLQuantizationType
PROMPT = [0, 17, 250, 33, 99, 5, 120]
HARD_STRINGS = [
    "Hello world", "  two leading spaces", "trailing  ", "tabs\tand\nnewlines\n\n\n", "\r\n\r\nwindows",
    "digits 12345 and 3.14159, 1,000,000 and 007", "unicode: café naïve 日本語 Ελληνικά русский",
    "emoji 🙂 👍🏽 and a family 👨‍👩‍👧", "non\u00a0breaking and zero\u200bwidth", "don't you'll I'm THEY'RE",
    "<|im_start|>user\nHi there<|im_end|>\n", "<|endoftext|> special in text", "x" * 64, "😀" * 5,
    "def f(x):\n    return x ** 2  # code", "\u0301combining first", "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke about édge devices."}],
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's Q4_1 GGUF imported by the CLI, and transformers' own reading of it."""
    source = default_gguf()
    folder = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, "-m", "edge_llm", "import", str(source), str(folder)], check=True,
                   capture_output=True, timeout=120)
    ref_tok = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return source, folder, ref_tok


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    source, folder, ref_tok = smollm2
    prompt = ref_tok.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}],
                                         tokenize=True, add_generation_prompt=True)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                              dtype=torch.float32).eval()
    return prompt, greedy(model, prompt, 24)


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=None)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.logits, tokens)]


def test_smollm2_tokenizer_matches_transformers(smollm2):
    _, folder, ref_tok = smollm2
    ours = load_tokenizer(folder, load_config(folder))
    for text in HARD_STRINGS:
        assert ours.encode(text) == ref_tok.encode(text), text
        assert ours.decode(ours.encode(text)) == ref_tok.decode(ref_tok.encode(text), skip_special_tokens=True)


def test_token_bytes_rebuild_the_text_even_when_tokens_split_characters(smollm2):
    """OpenAI chat logprobs `bytes`: each token's own bytes (an emoji spans byte tokens), which
    concatenated are the text's UTF-8."""
    _, folder, _ = smollm2
    ours = load_tokenizer(folder, load_config(folder))
    for text in HARD_STRINGS:
        ids = ours.encode(text, add_special_tokens=False)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode(), text
    emoji = ours.encode("🙂", add_special_tokens=False)
    assert len(emoji) > 1 and all(ours.token_bytes(i) != "\ufffd".encode() for i in emoji)


def test_smollm2_streamed_text_is_transformers_decode(smollm2):
    """Streaming token by token (a short window decoded each time) gives what transformers decodes
    from the whole output, also where a character spans byte tokens (emoji, combining marks)."""
    _, folder, ref_tok = smollm2
    ours = load_tokenizer(folder, load_config(folder))
    prompt = ours.encode("Repeat after me:", add_special_tokens=False)
    for text in HARD_STRINGS:
        ids = ours.encode(text, add_special_tokens=False)
        inc = IncrementalText(ours, prompt, ())
        streamed = "".join(inc.add(t) for t in ids) + inc.flush()
        assert streamed == ref_tok.decode(ids, skip_special_tokens=True), text


def test_smollm2_chat_template_matches_transformers(smollm2):
    _, folder, ref_tok = smollm2
    ours = load_tokenizer(folder, load_config(folder))
    for messages in CHATS:
        rendered = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(messages) == rendered
        ids = ref_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ours.encode_chat(messages) == list(ids)


@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_smollm2_cluster_matches_transformers(smollm2, smollm2_reference, tmp_path, workers):
    _, folder, _ = smollm2
    prompt, (ref_tokens, ref_logprobs) = smollm2_reference
    assert len(ref_tokens) == 24  # a poem is longer than 24 tokens: every step is compared
    cluster = ClusterProcess(folder, workers, tmp_path)
    try:
        status, body = await complete(cluster.url, prompt)
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["token_ids"] == ref_tokens
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=INTEGER_KERNELS_TOLERANCE)
    finally:
        cluster.stop()


# The served model's int4 and Q8_0 GEMVs run on integer dot products where the host has AVX-512 VNNI
# (models.vnni_kernels): each x is held to 2^-20 of its group's largest |x|, 16 times float32's own
# rounding unit (2^-24). With the float kernels the same model is float32-exact: within 1.4e-5 of
# transformers in float64 on this prompt (the test below holds it to 1e-4); the integer kernels
# measured up to 1.2e-4 from it (mean 1.6e-5), so 16 x the float path's 1.4e-5, rounded up: 2.5e-4.
INTEGER_KERNELS_TOLERANCE = 2.5e-4


def test_smollm2_float_kernels_match_transformers_to_float32_rounding(smollm2, smollm2_reference, monkeypatch):
    """The served path on one device (prefill, then one decode step per token, teacher-forced on the
    reference's tokens) with the float GEMV kernels: the float32 contract, logprobs within 1e-4."""
    monkeypatch.setattr(vnni_kernels, "ENABLED", False)
    _, folder, _ = smollm2
    prompt, (ref_tokens, ref_logprobs) = smollm2_reference
    model = LocalModel(str(folder), quantize="auto")
    kv = model.new_cache(len(prompt) + len(ref_tokens))
    logits = [model.forward(prompt, kv)] + [model.forward([t], kv) for t in ref_tokens[:-1]]
    ours = [float(torch.log_softmax(x.float(), -1)[t]) for x, t in zip(logits, ref_tokens, strict=True)]
    assert [int(x.argmax()) for x in logits] == ref_tokens
    assert ours == pytest.approx(ref_logprobs, abs=1e-4)


# (kind, matrix type, embedding type, device counts): Llama 3 rope through rope_freqs and llama.cpp's
# Q/K permutation, Qwen2's biases and tied embeddings, Qwen3's q and k norms; every tensor type the import supports appears
# in one of them, and each device count on both architectures.
FILES = [("llama", Q.Q8_0, None, (1, 2, 3)), ("qwen2", Q.Q8_0, Q.BF16, (1, 2, 3)),
         ("llama", Q.Q4_0, Q.Q4_1, (2,)), ("llama", Q.Q6_K, None, (1,)), ("llama", Q.Q4_K, Q.F16, (3,)),
         ("qwen2", Q.Q5_K, None, (2,)), ("qwen3", Q.Q8_0, None, (1, 2))]
K_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module", params=FILES, ids=lambda f: f"{f[0]}-{f[1].name}")
def written_gguf(request, tmp_path_factory):
    """A GGUF written here from a transformers checkpoint, and transformers' greedy run on that GGUF
    (given the source config for Llama 3 rope: its GGUF loader ignores rope_freqs)."""
    kind, quant, embed, workers = request.param
    tmp = tmp_path_factory.mktemp(f"{kind}-{quant.name}")
    sizes = K_SIZES if quant in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else {}
    if kind == "qwen3":  # transformers' GGUF loader takes Qwen3's default head_dim, not the file's key_length
        sizes = {"head_dim": 128}
    source = make_hf_checkpoint(tmp / "source", kind, seed=1, **sizes)
    path = write_gguf(source, tmp / f"{kind}.gguf", quant, embed=embed)
    config = {"config": transformers.AutoConfig.from_pretrained(source)} if kind == "llama" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32,
                                                              **config).eval()
    return path, workers, greedy(model, PROMPT, 24)


def test_written_gguf_generates_like_transformers(written_gguf):
    """`--model X.gguf` directly: imported once beside the file, then served on each device count."""
    path, device_counts, (ref_tokens, ref_logprobs) = written_gguf
    for workers in device_counts:
        cmd = [sys.executable, "-m", "edge_llm", "generate", "--model", str(path), "--prompt-ids",
               ",".join(map(str, PROMPT)), "--max-tokens", "24", "--json", "--workers", str(workers)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        ours = json.loads(out.stdout.strip().splitlines()[-1])
        n = len(ref_tokens)  # transformers stops at any eos of the source config; the file names one
        assert n >= 16 and ours["token_ids"][:n] == ref_tokens, workers
        assert ours["logprobs"][:n] == pytest.approx(ref_logprobs, abs=1e-4), workers


def run_import(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_llm", "import", str(source), str(out)],
                          capture_output=True, text=True, timeout=120)


def test_llama3_rope_is_kept_from_rope_freqs(tmp_path):
    source = make_hf_checkpoint(tmp_path / "source", "llama", seed=0)  # llama3 rope scaling
    path = write_gguf(source, tmp_path / "llama.gguf")
    assert run_import(path, tmp_path / "out").returncode == 0
    want = json.loads((source / "config.json").read_text())["rope_parameters"]
    scaling = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert want["rope_type"] == "llama3"
    assert scaling == {k: want[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}


def _truncated(tmp: Path) -> Path:
    path = write_gguf(make_hf_checkpoint(tmp / "src", "llama", seed=0), tmp / "cut.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _not_gguf(tmp: Path) -> Path:
    path = tmp / "notes.gguf"
    path.write_text("this is a text file, not a model")
    return path


def _unsupported_arch(tmp: Path) -> Path:
    return write_gguf(make_hf_checkpoint(tmp / "src", "llama", seed=0), tmp / "falcon.gguf", arch="falcon")


def _unsupported_type(tmp: Path) -> Path:
    return write_gguf(make_hf_checkpoint(tmp / "src", "llama", seed=0), tmp / "q5.gguf", Q.Q5_0)


@pytest.mark.parametrize(("make", "says"), [
    (_not_gguf, "not a GGUF file"), (_truncated, "truncated"),
    (_unsupported_arch, "architecture 'falcon' is not supported"), (_unsupported_type, "type Q5_0"),
])
def test_bad_gguf_fails_with_one_clear_line(tmp_path, make, says):
    path = make(tmp_path)
    for cmd in (["import", str(path), str(tmp_path / "out")],
                ["generate", "--model", str(path), "--prompt-ids", "1,2", "--max-tokens", "2"]):
        out = subprocess.run([sys.executable, "-m", "edge_llm", *cmd], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edge-llm: error: "), out.stderr
        assert str(path) in lines[0] and says in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_written_gguf_tokenizer_and_template_match_transformers(written_gguf, tmp_path):
    path, _, _ = written_gguf
    assert run_import(path, tmp_path / "out").returncode == 0
    ours = load_tokenizer(tmp_path / "out", load_config(tmp_path / "out"))
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # This vocabulary has no <|endoftext|>: transformers' GPT2Tokenizer adds its default one as id
    # 384, past the model's 384 rows; we keep it as text, as llama.cpp does.
    for text in (t for t in HARD_STRINGS if "<|endoftext|>" not in t):
        assert ours.encode(text) == ref.encode(text), text
    for messages in CHATS:
        assert ours.render_chat(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)


def test_sentencepiece_vocabulary_tokenizes_like_transformers(tmp_path):
    """A `llama` (sentencepiece BPE) vocabulary without merges, as Llama 2 and Mistral GGUFs carry it:
    merges rebuilt from the scores, spaces as '▁', unknown characters as byte tokens."""
    from gguf_writer import write_spm_gguf

    corpus = [t for t in HARD_STRINGS if t] * 3 + [c["content"] for chat in CHATS for c in chat] * 3
    source = make_hf_checkpoint(tmp_path / "source", "llama", seed=0)
    path = write_spm_gguf(source, tmp_path / "spm.gguf", corpus)
    assert run_import(path, tmp_path / "out").returncode == 0
    ours = load_tokenizer(tmp_path / "out", load_config(tmp_path / "out"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    unseen = ["Zebra quartz ☃ ünïcödé", "spaced   out  ", "numbers 0123456789"]
    texts = [t for t in HARD_STRINGS if "<|" not in t] + unseen
    for text in (t for t in texts if not t[:1].isspace()):
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True), text
    # Text that starts with a space: sentencepiece (and llama.cpp) always add the dummy '▁' prefix, so
    # "  two" is "▁▁▁two"; transformers' Metaspace adds it only when the text does not already start
    # with one. We follow the tokenizer the model was trained with.
    pieces = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for text in texts:  # byte fallback and '▁' give back every byte, after the dummy prefix
        ids = ours.encode(text, add_special_tokens=False)
        assert b"".join(ours.token_bytes(i) for i in ids) == (" " + text if text else "").encode(), text
    for text in (t for t in texts if t[:1].isspace() and t.isascii()):
        assert "".join(pieces.encode(text, add_special_tokens=False).tokens) == "\u2581" + text.replace(" ", "\u2581")
        assert ours.decode(ours.encode(text)) == text
