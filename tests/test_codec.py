"""Codec round trips (property-based) and the rejection of every malformed message shape."""

import random

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from transport.codec import decode, encode, pack_array, unpack_array
from transport.errors import FrameError, FrameTooLarge
from transport.frames import FrameParser, frame

DTYPES = [np.float32, np.float16, np.int32, np.int64]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, max_side=7))))
def test_tensor_round_trip_is_exact(arr):
    back = unpack_array(decode(encode({"t": "x", "x": pack_array(arr)}))["x"])
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()  # bit-exact, NaNs included


def test_bfloat16_travels_as_raw_bits():
    raw = np.array([0x3F80, 0xC000, 0x7FC0], dtype=np.uint16)  # 1.0, -2.0, nan in bf16
    back = unpack_array(decode(encode({"t": "x", "x": pack_array(raw, "bfloat16")}))["x"])
    assert back.dtype == np.uint16 and back.tobytes() == raw.tobytes()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=10), max_size=5))
def test_message_round_trip(payload):
    msg = {"t": "m", **{k: v for k, v in payload.items() if k != "t"}}
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x91\x01", msgpack.packb({"no_tag": 1}), msgpack.packb({"t": 5}),
    msgpack.packb({"t": "x"}) + b"\x00",  # trailing bytes
    msgpack.packb(msgpack.ExtType(1, b"pickle?")), msgpack.packb({"t": "x", "e": msgpack.ExtType(42, b"x")}),
    msgpack.packb({1: 2}),
])
def test_bad_messages_are_frame_errors(body):
    with pytest.raises(FrameError):
        decode(body)


@pytest.mark.parametrize("tensor", [
    {"dtype": "object", "shape": [1], "data": b"\x00" * 8},
    {"dtype": "float32", "shape": [2], "data": b"\x00" * 4},
    {"dtype": "float32", "shape": [-1], "data": b""},
    {"dtype": "float32", "shape": "3", "data": b"\x00" * 12},
    {"dtype": "float32", "shape": [1], "data": "text!"},
    {"dtype": "float32", "shape": [1], "data": b"\x00" * 4, "extra": 1},
    [1, 2, 3],
])
def test_bad_tensors_are_frame_errors(tensor):
    with pytest.raises(FrameError):
        unpack_array(decode(encode({"t": "x", "x": tensor}))["x"])


def test_oversize_frame_is_refused_before_its_body_arrives():
    got = []
    parser = FrameParser(got.append, max_frame=1024)
    parser.feed(frame(b"a" * 1024))
    assert got == [b"a" * 1024]
    with pytest.raises(FrameTooLarge):
        parser.feed((1025).to_bytes(4, "big"))  # only the header: refused at once


def test_frames_split_across_reads_reassemble():
    got = []
    parser = FrameParser(got.append)
    stream = frame(b"hello") + frame(b"") + frame(b"world")
    for i in range(len(stream)):
        parser.feed(stream[i:i + 1])
    assert got == [b"hello", b"", b"world"]


@pytest.mark.parametrize("seed", range(5))
def test_frames_in_reads_of_any_size_reassemble(seed):
    """Bodies of 0 bytes to a megabyte in reads cut anywhere (inside headers too), bodies kept apart."""
    rng = random.Random(seed)
    bodies = [rng.randbytes(rng.choice([0, 1, 3, 4, 5, 300, 70_000, 1 << 20])) for _ in range(30)]
    stream = b"".join(frame(b) for b in bodies)
    got, pos = [], 0
    parser = FrameParser(lambda body: got.append(bytes(body)))
    while pos < len(stream):
        step = rng.choice([1, 2, 3, 5, 4096, 65536, 300_000])
        parser.feed(stream[pos:pos + step])
        pos += step
    assert got == bodies
