"""int8 / int4 weight-only quantization: the formats, the GEMV kernels, and whole clusters against
transformers running the same quantized weights.

Oracles: the grouped formats are checked against llama.cpp's own block definitions (the `gguf`
package's Q4_1 / Q8_0 dequantizers, fed our bytes re-packed as GGUF blocks); the kernels against a
float64 product of the dequantized weights; the cluster against a float32 transformers model whose
Linear weights are replaced by the dequantized int8/int4 weights.

Tolerance of the cluster test: our kernels and transformers multiply the same float32 weights
(dequantized values, exact in float32 up to one rounding of scale x q + min) by the same
activations; they differ only in the order of float32 additions, per dot product at most
gamma_K = K x 2^-24 relative to sum |w||x| (K <= 520 here: 3e-5), the same kind and size of
difference as between transformers' own kernels and our float32 path. So the float32 bound of
the project applies unchanged: logprobs within 1e-4 (the kernel test below checks gamma_K itself).
On an AVX-512 VNNI host int4 and Q8_0 take the integer kernels (models.vnni_kernels), which
hold each group of 32 of x as integers times 2^-S: at most 2^-20 of the group's largest |x| off
per element, 2^-20 sum_g max_j|x_j| sum_j |w_j| per dot product, below the gamma_K term
(2^-24 K sum |w||x|) unless a group's largest |x| is over K / 16 = 30 times its mean: the same
1e-4 holds, and the kernel test below checks that bound too.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager

import gguf
import numpy as np
import pytest
import torch
import transformers
from cluster_proc import ClusterProcess
from hf_reference import hf_greedy, make_hf_checkpoint
from test_cluster import complete
from test_dtype import weight_bytes

from models import vnni_kernels
from models.config import load_config
from models.errors import CheckpointError
from models.quant import GROUP, QuantWeight, deinterleaved, gather_quantized, quantize
from models.quant_kernels import CHUNKED_ROWS, GEMV_ROWS, gemv_rows, linear
from models.sharding import PlanError, local_dims
from models.threads import kernel_threads, set_threads

PROMPT = [0, 17, 250, 33, 99, 5, 120]
NEW_TOKENS = 24
U = 2.0**-24  # float32 unit roundoff


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * k**-0.5


# --- formats ---------------------------------------------------------------------------------------

def as_gguf_q4_1(w: QuantWeight) -> np.ndarray:
    """Our int4 bytes as GGUF Q4_1 blocks: [N, G] blocks of (d f16, m f16, 16 bytes of nibbles)."""
    n, k = w.shape
    q, scale, minimum = w.plain()  # [G, 16, N], [G, N], [G, N]
    qs = q.permute(2, 0, 1).numpy()  # [N, G, 16]: byte j = element j (low), j + 16 (high)
    d = scale.T.contiguous().numpy().view(np.uint8).reshape(n, k // GROUP, 2)
    m = minimum.T.contiguous().numpy().view(np.uint8).reshape(n, k // GROUP, 2)
    return np.concatenate([d, m, qs], axis=2).reshape(n, -1)


def test_int4_is_gguf_q4_1_byte_for_byte():
    w = random_weight(24, 96)
    qw = quantize(w, "int4")
    blocks = as_gguf_q4_1(qw)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(qw.dequantize().numpy(), theirs)
    # 15 steps between each group's min and max: every weight within half a step of its original
    step = qw.plain()[1].float().T.repeat_interleave(GROUP, 1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-3 * step + 1e-6).all()


def test_int8g_is_gguf_q8_0():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (4, GROUP, 8), generator=gen, dtype=torch.int8)  # [G, 32, N]
    scale = (torch.rand(4, 8, generator=gen) * 0.01).to(torch.float16)  # [G, N]
    qw = QuantWeight.from_plain("int8g", q, scale)
    blocks = np.concatenate([scale.T.contiguous().numpy().view(np.uint8).reshape(8, 4, 2),
                             q.permute(2, 0, 1).numpy().view(np.uint8)], axis=2).reshape(8, -1)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(qw.dequantize().numpy(), theirs)


def test_int4_words_hold_a_channels_bytes_of_a_group_side_by_side():
    """The kernel's view of held int4 codes: word [c, g, r, t] (uint32) is bytes 4r..4r+3 of group
    g of channel c x T + t, byte b at bits 8b (elements 4r + b in the low nibble, + 16 in the high)."""
    qw = quantize(random_weight(40, 128, seed=3), "int4")  # 5 tiles of 8, 4 groups
    q = qw.plain()[0].long()  # [G, 16, N]
    groups, _, n = q.shape
    expected = (q.reshape(groups, 4, 4, n) << torch.tensor([0, 8, 16, 24])[None, None, :, None]).sum(2)  # [G, 4, N]
    words = torch.from_numpy(qw.arrays[0].astype(np.int64))  # [C, G, 4, T]
    assert qw.tile == 8 and words.shape == (5, groups, 4, 8)
    assert torch.equal(words.permute(1, 2, 0, 3).reshape(groups, 4, n), expected)


def int8g_weight(n: int, k: int, seed: int) -> QuantWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (k // GROUP, GROUP, n), generator=gen, dtype=torch.int8)  # [G, 32, N]
    return QuantWeight.from_plain("int8g", codes, (torch.rand(k // GROUP, n, generator=gen) * 0.01).half())


def test_int8g_words_hold_four_signed_codes_of_a_channel():
    """Word [c, g, r, t] of held int8g codes is elements 4r..4r+3 of channel c x T + t's group g,
    element 4r + b as the signed byte at bits 8b (the kernel sign-extends each with two shifts)."""
    qw = int8g_weight(40, 64, seed=5)
    q = qw.plain()[0].long()  # [G, 32, N], -127..127
    groups, _, n = q.shape
    words = torch.from_numpy(qw.arrays[0].astype(np.int64))  # [C, G, 8, T]
    codes = torch.stack([((words >> (8 * b)) & 255) for b in range(4)], -1)  # [C, G, 8, T, 4] unsigned
    codes = torch.where(codes > 127, codes - 256, codes)
    assert torch.equal(codes.permute(1, 2, 4, 0, 3).reshape(groups, GROUP, n), q)


@pytest.mark.parametrize("kind", ["int4", "int8g"])
def test_split_files_of_the_earlier_grouped_layout_still_load(kind):
    """Split files written before the word layout hold grouped tiles as [C, G, 16 | 32, T]: read back,
    they are the same weights."""
    qw = quantize(random_weight(40, 128, seed=4), "int4") if kind == "int4" else int8g_weight(40, 128, seed=4)
    earlier = {"w.q": deinterleaved(qw.q), "w.scale": qw.scale} | ({"w.min": qw.min} if kind == "int4" else {})
    loaded = gather_quantized(earlier)["w"]
    assert loaded.kind == kind and torch.equal(loaded.q, qw.q)
    assert torch.equal(loaded.dequantize(), qw.dequantize())


def test_int8_per_channel_rounds_to_nearest():
    w = random_weight(16, 80)
    w[3] = 0.0  # an all-zero row keeps a usable scale
    qw = quantize(w, "int8")
    q = qw.plain()[0].T  # [N, K]
    assert q.dtype == torch.int8 and qw.scale.shape == (16,)
    amax = w.abs().amax(1)
    np.testing.assert_allclose(qw.scale[amax > 0].numpy(), (amax[amax > 0] / 127).numpy(), rtol=1e-7)
    assert (q.abs().amax(1)[amax > 0] == 127).all()
    assert ((qw.dequantize() - w).abs() <= qw.scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (qw.dequantize()[3] == 0).all()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_slices_of_the_quantized_tensor_are_its_values(method):
    """What a rank holds is the whole tensor's quantization, sliced: the same values on any plan."""
    w = random_weight(40, 128, seed=1)
    whole = quantize(w, method).dequantize()
    np.testing.assert_array_equal(quantize(w, method).rows(8, 24).dequantize(), whole[8:24])
    np.testing.assert_array_equal(quantize(w, method).cols(32, 96).dequantize(), whole[:, 32:96])
    if method == "int4":
        with pytest.raises(CheckpointError, match="cuts a quantization group"):
            quantize(w, method).cols(16, 96)


def test_plans_align_input_slices_to_groups(llama):
    cfg = load_config(llama)  # 6 heads of 16, 320 MLP columns
    for workers in (2, 3):
        for dims in local_dims(cfg, workers, align=(GROUP, GROUP)):
            assert dims.head_start * dims.head_dim % GROUP == 0 and dims.n_local_heads * dims.head_dim % GROUP == 0
            assert dims.mlp_start % GROUP == 0 and dims.local_intermediate % GROUP == 0
    with pytest.raises(PlanError, match="quantization groups"):
        local_dims(cfg, 4, align=(GROUP, GROUP))  # 3 pairs of 16-wide heads cannot make 4 ranks


def test_int4_refuses_a_model_without_whole_groups(tmp_path):
    from models.model import LocalModel

    folder = make_hf_checkpoint(tmp_path / "odd", "llama", intermediate_size=200)
    with pytest.raises(CheckpointError, match="intermediate_size in multiples of 32"):
        LocalModel(folder, quantize="int4")


# --- kernels ---------------------------------------------------------------------------------------

@contextmanager
def on_threads(threads: int) -> Iterator[None]:
    """The kernels on `threads` threads meanwhile; the process's count back after."""
    before = kernel_threads()
    try:
        set_threads(threads)
        yield
    finally:
        set_threads(before)


def summed_magnitudes(qw: QuantWeight, deq: torch.Tensor, method: str) -> torch.Tensor:
    """Per weight [N, K], the magnitude the kernel's float32 sums carry for it: |w| (int8, int8g);
    for int4 16 |scale| f + |min - 16 scale|, f = 1 + q / 16 (models.quant_kernels: it sums f x, not
    q x); for the integer int4 kernel |scale| q + |min| (its float32 steps: scale times the group's
    exact integer sum, min times the group's sum of x)."""
    if qw.kind != "int4":
        return deq.abs()
    q, scale, minimum = (t.double() for t in qw.plain())  # [G, 16, N], [G, N], [G, N]
    codes = torch.cat([q.remainder(16), q.div(16, rounding_mode="floor")], 1)  # [G, 32, N]
    if method == "int4v":  # the integer kernel
        c = scale[:, None, :].abs() * codes + minimum[:, None, :].abs()
    else:
        s16 = 16 * scale[:, None, :]
        c = s16.abs() * (1 + codes / 16) + (minimum[:, None, :] - s16).abs()
    return c.reshape(-1, c.shape[-1]).T  # [N, K]


# int4 and int8g have two kernels each: "int4", "int8g" the float ones (every host), "int4v",
# "int8gv" the integer ones (models.vnni_kernels, AVX-512 VNNI hosts).
METHODS = ["int8", "int4", "int8g"] + (["int4v", "int8gv"] if vnni_kernels.HOST_HAS_VNNI else [])


def kind_of_method(method: str) -> str:
    return method.removesuffix("v")


@contextmanager
def kernel_for(method: str) -> Iterator[None]:
    """The kernels `method` names meanwhile (the integer ones for "int4v" / "int8gv", else none)."""
    before = vnni_kernels.ENABLED
    try:
        vnni_kernels.ENABLED = method.endswith("v")
        yield
    finally:
        vnni_kernels.ENABLED = before


def int8g_from(w: torch.Tensor, seed: int = 9) -> QuantWeight:
    """w's int8 codes as Q8_0 blocks with scales of their own per group."""
    n, k = w.shape
    q8 = quantize(w, "int8").plain()[0].T.reshape(n, k // GROUP, GROUP).permute(1, 2, 0)  # [G, 32, N]
    scale = 0.002 + 0.004 * torch.rand(k // GROUP, n, generator=torch.Generator().manual_seed(seed))
    return QuantWeight.from_plain("int8g", q8, scale.to(torch.float16))


def representation_error(qw: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    """[R, N]: what holding x in integers can cost an integer kernel, from its contract
    (models.vnni_kernels): per group g of a row of x, S = min(120, 20 - e) where the group's largest
    |x| is below 2^e, and each x_j within 2^-(S+1); so sum_g |scale| sum_j |code_j| 2^-(S+1)."""
    q, scale = (t.double() for t in qw.plain()[:2])  # [G, 16 | 32, N], [G, N]
    if qw.kind == "int4":
        codes = torch.cat([q.remainder(16), q.div(16, rounding_mode="floor")], 1).sum(1)  # [G, N]
    else:
        codes = q.abs().sum(1)
    largest = x.double().reshape(x.shape[0], -1, GROUP).abs().amax(-1)  # [R, G]
    shift = (20 - torch.frexp(largest).exponent).clamp(max=120)
    return 2.0 ** -(shift.double() + 1) @ (scale.abs() * codes)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("rows", "threads"), [(1, 1), (1, 2), (3, 1), (3, 2), (GEMV_ROWS + 5, 2),
                                               (CHUNKED_ROWS + 3, 2)])
def test_kernel_error_within_float32_dot_product_bound(method, rows, threads):
    """|y - exact| <= K u sum (|w| + c)|x| with the exact product in float64 of the dequantized
    weights w, and c what the kernel's sums carry per weight (`summed_magnitudes`): each output is
    a float32 sum of products over those magnitudes, every term through fewer than K roundings
    (K u sum c|x|), and the reference's weights are scale x q + min rounded once (K u sum |w||x|
    covers it). For int8 and int8g c = |w|: the plain float32 dot-product bound. For int4 the kernel
    sums 16 scale (1 + q/16) x and (min - 16 scale) x, magnitudes ~17x |w| for Gaussian weights:
    a looser worst case; measured, its error is 3-4x that of summing q x (576 x 576 weights). The
    integer kernels: c = |scale| q + |min| (int4), |w| (int8g), plus `representation_error` (to
    test it, a group whose largest |x| is ~1000x the others', and a group of zeros).
    72 channels are 9 tiles of 8: runs of tiles per thread that STREAMS does not divide; 288 (the
    integer kernels, which take tiles of whole 16-lane vectors) two tiles of 144."""
    n, k = (288, 576) if method.endswith("v") else (72, 576)
    w = random_weight(n, k, seed=2)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(5))
    x[0, 40] *= 1024.0
    x[-1, 64:96] = 0.0
    kind = kind_of_method(method)
    qw = int8g_from(w) if kind == "int8g" else quantize(w, kind)
    deq = qw.dequantize().double()
    exact = x.double() @ deq.T
    bound = k * U * (x.double().abs() @ (deq.abs() + summed_magnitudes(qw, deq, method)).T)
    if method.endswith("v"):
        bound += representation_error(qw, x)
    with on_threads(threads), kernel_for(method):
        y = linear(x, qw)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_deterministic(method, threads):
    """The same call gives the same bits every time (no reduction order left to thread scheduling),
    so ranks and runs stay reproducible. (The serial and the parallel build may contract to FMA
    differently; both hold the float32 bound above.)"""
    n = 320 if method.endswith("v") else 300  # the integer kernels: two tiles of 160
    w = random_weight(n, 256, seed=4)
    kind = kind_of_method(method)
    qw = int8g_from(w) if kind == "int8g" else quantize(w, kind)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(6))
    with on_threads(threads), kernel_for(method):
        runs = [torch.from_numpy(gemv_rows(x.numpy(), qw)) for _ in range(5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


# --- whole clusters against transformers ------------------------------------------------------------

def make_quant_checkpoint(root, kind: str = "llama", seed: int = 7):
    """A llama whose Linear inputs come in whole groups on 1-3 devices (6 heads of 16, 320 columns)."""
    sizes = {"intermediate_size": 320} if kind == "llama" else {"intermediate_size": 192}
    return make_hf_checkpoint(root / f"{kind}-{seed}", kind, seed=seed, **sizes)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_quant_checkpoint(tmp_path_factory.mktemp("quant"))


def dequantized_reference(folder, method: str):
    """transformers' float32 model of `folder` with every Linear weight replaced by its dequantized
    `method` weights (the LM head: int8 under int4, as the README states); the embedding stays as
    shipped. Returns its greedy run."""
    out = folder.with_name(f"{folder.name}-ref-{method}")
    if not out.exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    how = "int8" if module is model.lm_head else method
                    module.weight = torch.nn.Parameter(quantize(module.weight.data, how).dequantize())
        model.config.tie_word_embeddings = False  # the LM head is quantized, the embedding is not
        model.save_pretrained(out)
    return hf_greedy(out, PROMPT, NEW_TOKENS)


@functools.cache
def reference(folder, method: str):
    return folder, dequantized_reference(folder, method)


def expected_quant_bytes(folder, workers: int, method: str) -> dict[int, int]:
    """Per rank: Linear parameters x bits / 8 plus their scales (int8: float32 per output row; int4:
    float16 scale and min per 32 weights; the LM head int8 either way), norms at 4 bytes, rank 0's
    float32 embedding table."""
    cfg = load_config(folder)
    d, hd = cfg.hidden_size, cfg.head_dim

    def linear_bytes(n, k, how=method):
        return n * k + 4 * n if how == "int8" else n * k // 2 + 4 * (n * k // GROUP)

    out = {}
    for dims in local_dims(cfg, workers, align=(GROUP, GROUP) if method == "int4" else (1, 1)):
        q, kv, f = dims.n_local_heads * hd, dims.n_local_kv_heads * hd, dims.local_intermediate
        layer = (linear_bytes(q, d) + 2 * linear_bytes(kv, d) + linear_bytes(d, q) + 2 * linear_bytes(f, d)
                 + linear_bytes(d, f) + 2 * d * 4)
        out[dims.rank] = (cfg.num_layers * layer + linear_bytes(dims.local_vocab, d, "int8") + d * 4
                          + (cfg.vocab_size * d * 4 if dims.rank == 0 else 0))
    return out


@pytest.mark.parametrize(("method", "workers"), [(m, w) for m in ("int8", "int4") for w in (1, 2, 3)])
async def test_quantized_cluster_matches_transformers_with_the_same_weights(llama, tmp_path, method, workers):
    folder, (ref_tokens, ref_logprobs) = reference(llama, method)
    cluster = ClusterProcess(folder, workers, tmp_path, "--quantize", method)
    try:
        status, body = await complete(cluster.url, PROMPT)
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["token_ids"] == ref_tokens
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
        assert await weight_bytes(cluster.url) == expected_quant_bytes(folder, workers, method)
    finally:
        cluster.stop()


async def test_quantized_qwen2_with_biases_and_tied_head(tmp_path):
    """q/k/v biases and a tied LM head (quantized on its own, the embedding left whole), on 2 devices."""
    folder = make_quant_checkpoint(tmp_path, "qwen2", seed=8)
    ref_tokens, ref_logprobs = dequantized_reference(folder, "int4")
    cluster = ClusterProcess(folder, 2, tmp_path, "--quantize", "int4")
    try:
        status, body = await complete(cluster.url, PROMPT)
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref_tokens
        assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
    finally:
        cluster.stop()


async def test_quantized_split_streams_quantized_bytes_through_the_window(llama, tmp_path):
    """Under a memory budget the split files hold the int4 codes and scales, and the window reads them."""
    from safetensors import safe_open

    folder, (ref_tokens, ref_logprobs) = reference(llama, "int4")
    split = tmp_path / "split"
    cluster = ClusterProcess(folder, 2, tmp_path, "--quantize", "int4", "--memory-budget-mb", "0.2",
                             "--split-dir", str(split))
    try:
        status, body = await complete(cluster.url, PROMPT)
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref_tokens
        assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(f"{cluster.url}/metrics") as r:
            metrics = await r.text()
        assert re.search(r'^edge_window_bytes_read_total\{rank="0"\} [1-9]', metrics, re.M), metrics
    finally:
        cluster.stop()
    assert '"quantize": "int4"' in (split / "manifest.json").read_text()
    with safe_open(str(split / "rank-1-of-2" / "layer-000.safetensors"), framework="pt") as f:
        dtypes = {n: f.get_tensor(n).dtype for n in f.keys()}  # noqa: SIM118
    assert dtypes["w_down.q"] == torch.uint8 and dtypes["w_down.scale"] == torch.float16
    assert dtypes["attn_norm"] == torch.float32 and "w_down" not in dtypes


# --- GGUF blocks kept as they are -------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_moved_not_rounded_again(tmp_path, quant):
    """An imported Q4_0/Q4_1/Q8_0 matrix is stored as our blocks whose values are exactly llama.cpp's
    dequantization of the file's blocks (Q/K rows un-permuted), and served from those blocks."""
    from gguf_writer import write_gguf

    from models.checkpoint import Checkpoint
    from models.gguf_import import _unpermute, import_gguf

    kind = gguf.GGMLQuantizationType[quant]
    source = make_hf_checkpoint(tmp_path / "src", "llama", seed=3, intermediate_size=320)
    path = write_gguf(source, tmp_path / "m.gguf", kind)
    folder = import_gguf(path, tmp_path / "imported")
    ckpt = Checkpoint(folder).with_quant("auto")
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name not in ("blk.1.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.attn_output.weight"):
            continue
        assert t.tensor_type == kind
        theirs = gguf.quants.dequantize(t.data, kind).reshape(int(t.shape[1]), int(t.shape[0]))
        if ".attn_q." in t.name:
            theirs = _unpermute(theirs, 6)
        name = {"blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
                "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
                "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight"}[t.name]
        held = ckpt.read_weight(name)
        assert isinstance(held, QuantWeight) and held.kind == ("int8g" if quant == "Q8_0" else "int4")
        assert held.nbytes == t.n_bytes + (2 * held.scale.numel() if quant == "Q4_0" else 0)  # + Q4_0's min
        np.testing.assert_array_equal(held.dequantize().numpy(), theirs)
    assert Checkpoint(folder).with_quant("none").read_weight("model.layers.0.mlp.down_proj.weight").dtype == \
        torch.float32


async def test_concurrent_requests_decode_as_one_quantized_batch(llama, tmp_path):
    """Four requests at once: their decode steps run as batched forwards (the kernels take 4 rows of
    x), and each gets transformers' greedy tokens and logprobs."""
    import asyncio

    import aiohttp

    folder, (ref_tokens, ref_logprobs) = reference(llama, "int4")
    cluster = ClusterProcess(folder, 2, tmp_path, "--quantize", "int4")
    try:
        results = await asyncio.wait_for(asyncio.gather(*[complete(cluster.url, PROMPT) for _ in range(4)]), 120)
        for status, body in results:
            assert status == 200, body
            assert body["choices"][0]["token_ids"] == ref_tokens
            assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
        async with aiohttp.ClientSession() as s, s.get(f"{cluster.url}/metrics") as r:
            metrics = await r.text()
        steps = float(re.search(r"^edge_cluster_steps_total (\S+)$", metrics, re.M)[1])
        rows = float(re.search(r"^edge_cluster_step_rows_total (\S+)$", metrics, re.M)[1])
        assert rows > steps  # some forwards carried several requests
    finally:
        cluster.stop()


def test_damaged_quantized_checkpoint_is_refused_with_its_name(tmp_path):
    """Blocks whose parts do not match config.json (or a missing scale) fail at open, naming the tensor."""
    from gguf_writer import write_gguf
    from safetensors.torch import load_file, save_file

    from models.checkpoint import Checkpoint
    from models.gguf_import import import_gguf

    source = make_hf_checkpoint(tmp_path / "src", "llama", seed=3, intermediate_size=320)
    folder = import_gguf(write_gguf(source, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q4_1), tmp_path / "imp")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    for damage in ("shape", "scale"):
        broken = dict(tensors)
        if damage == "shape":
            broken[f"{name}.q"] = broken[f"{name}.q"][:, :, :-1].contiguous()
        else:
            del broken[f"{name}.scale"]
        save_file(broken, folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=re.escape(name)):
            Checkpoint(folder)


def test_a_tied_head_shares_the_embedding_unless_quantized(tmp_path):
    """Under the default --quantize auto a float checkpoint's tied LM head is the embedding table
    itself (one copy in memory); quantized, it is a QuantWeight of its own."""
    from models.model import LocalModel

    folder = make_hf_checkpoint(tmp_path / "qwen2", "qwen2", seed=1)
    model = LocalModel(folder)
    assert model.head.lm_head is model.head.embed
    assert isinstance(LocalModel(folder, quantize="int8").head.lm_head, QuantWeight)
