"""Tests of the checkpoint format (safetensors), the config and the parameter
names and counts of the architecture's definition (docs/architecture.md, §8)."""
import json
import warnings
import math
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorfile  # noqa: E402
import wyrd  # noqa: E402
import checkpoint  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from wyrd import Chimera, ChimeraConfig, get_config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# ---------------------------------------------------------------------------
# helpers


def safetensors_bytes(entries, metadata=None, pad=True):
    """A safetensors file written by hand: entries is a list of (name, dtype, shape, raw bytes)."""
    header, chunks, offset = {}, [], 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    return raw_file(header, b"".join(chunks), pad)


def raw_file(header, data, pad=True):
    """8-byte little-endian length, the header (any JSON value, or raw bytes), the data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    if pad:
        blob += b" " * (-len(blob) % 8)
    while len(blob) % 256 == 0x80 or len(blob) % 65536 == 0x4B50:
        # these lengths start with the bytes of a pickle (0x80) or zip (b"PK") magic
        # number; test_header_length_that_looks_like_a_magic_number_still_loads covers them
        blob += b" " * 8
    return struct.pack("<Q", len(blob)) + blob + data


def parse(raw):
    """Header and data section of a safetensors file, parsed independently of wyrd."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n].decode("utf-8")), raw[8 + n:], n


def bf16_bits(values):
    """float32 values that bfloat16 holds exactly -> their bfloat16 bit patterns (uint16)."""
    bits = np.asarray(values, np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)
    return (bits >> 16).astype("<u2")


def nano_tensors(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def nano():
    return Chimera("nano", seed=3, init="reference")  # every weight nonzero


@pytest.fixture()
def nano_file(nano, tmp_path):
    path = tmp_path / "nano.safetensors"
    checkpoint.save(str(path), nano)
    return path


def expect_error(path, *words):
    """Reading (and loading) `path` raises CheckpointError naming the file and the problem."""
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(str(path))
    msg = str(e.value)
    assert str(path) in msg, msg
    problem = msg.replace(str(path), "")  # the words must not come from the path itself
    for w in words:
        assert w.lower() in problem.lower(), f"{w!r} not in {msg!r}"
    return problem


# ---------------------------------------------------------------------------
# round trips


def test_save_load_roundtrip_is_bit_exact(nano, tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save(str(path), nano, step=1234, lr=3e-4, note="café", history=[1.5, 2.25])
    model, tok, meta = checkpoint.load(str(path))
    assert tok is None
    assert meta == {"step": 1234, "lr": 3e-4, "note": "café", "history": [1.5, 2.25]}
    assert model.config == nano.config
    a, b = nano.state_dict(), model.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert b[name].dtype == np.float32
        assert b[name].tobytes() == a[name].tobytes(), name
        assert not np.shares_memory(b[name], a[name])


def test_load_without_meta_gives_empty_dict(nano, nano_file):
    model, tok, meta = checkpoint.load(str(nano_file))
    assert meta == {} and tok is None
    assert model.num_params() == nano.num_params()


def test_untied_model_roundtrip_stores_lm_head(tmp_path):
    cfg = ChimeraConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, sliding_window=4,
                        max_seq_len=32, attention_every_n=2, tie_word_embeddings=False)
    m = Chimera(cfg, seed=5, init="reference")
    path = tmp_path / "untied.safetensors"
    checkpoint.save(str(path), m)
    header, _, _ = parse(path.read_bytes())
    assert header["lm_head.weight"]["shape"] == [40, 16]
    m2, _, _ = checkpoint.load(str(path))
    assert not m2.config.tie_word_embeddings
    assert np.array_equal(m2.lm_head.weight.data, m.lm_head.weight.data)
    assert not np.array_equal(m2.lm_head.weight.data, m2.embed_tokens.weight.data)


def test_roundtrip_with_tokenizer(nano, tmp_path):
    texts = ["Once upon a time there was a little cat.", "The cat liked to play with a red ball.",
             "One day the cat saw a big dog. The dog wanted to play too!"] * 3
    tok = Tokenizer.train(texts, 256 + 3 + 24)
    path = tmp_path / "with_tok.safetensors"
    checkpoint.save(str(path), nano, tokenizer=tok, step=1)
    model, tok2, meta = checkpoint.load(str(path))
    assert meta == {"step": 1}
    assert tok2 is not None and tok2.vocab_size == tok.vocab_size
    sample = "The little dog saw a cat. <|im_end|> ünïcode"
    assert tok2.encode(sample) == tok.encode(sample)
    assert len(tok.encode(sample)) < len(sample.encode("utf-8"))  # merges were learned and kept
    assert tok2.decode(tok2.encode(sample)) == sample
    header, _, _ = parse(path.read_bytes())
    assert isinstance(header["__metadata__"]["tokenizer"], str)


def test_corrupt_tokenizer_metadata_is_a_checkpoint_error(nano, tmp_path):
    path = tmp_path / "badtok.safetensors"
    metadata = {"format": "wyrd", "config": json.dumps(nano.config.to_dict()), "tokenizer": "{not json"}
    tensorfile.write_safetensors(str(path), nano.state_dict(), metadata)
    expect_error(path, "tokenizer")


# ---------------------------------------------------------------------------
# the file on disk is standard safetensors

# The spec's parameter table written out for nano: V=512, d=64, 3 layers
# (0, 1 recurrent; 2 attention), H=4, KV=2, D=16, ffn = ceil(int(64*8/3)/256)*256 = 256.
V, d, F, H, KV, D = 512, 64, 256, 4, 2, 16
NANO_SHAPES = {"embed_tokens.weight": (V, d), "norm.weight": (d,)}
for _i in range(3):
    NANO_SHAPES.update({f"layers.{_i}.norm1.weight": (d,), f"layers.{_i}.norm2.weight": (d,),
                        f"layers.{_i}.ffn.w1.weight": (F, d), f"layers.{_i}.ffn.w3.weight": (F, d),
                        f"layers.{_i}.ffn.w2.weight": (d, F)})
for _i in (0, 1):
    _p = f"layers.{_i}.temporal_mix."
    NANO_SHAPES.update({_p + "input_proj.weight": (d, d), _p + "input_gate_proj.weight": (d, d),
                        _p + "input_gate_proj.bias": (d,), _p + "recurrence_gate_proj.weight": (d, d),
                        _p + "recurrence_gate_proj.bias": (d,), _p + "lambda_param": (d,),
                        _p + "h0": (1, 1, d), _p + "norm.weight": (d,), _p + "output_proj.weight": (d, d)})
NANO_SHAPES.update({"layers.2.temporal_mix.q_proj.weight": (H * D, d), "layers.2.temporal_mix.k_proj.weight": (KV * D, d),
                    "layers.2.temporal_mix.v_proj.weight": (KV * D, d), "layers.2.temporal_mix.o_proj.weight": (d, H * D)})


def test_nano_parameter_names_and_shapes_follow_the_spec(nano):
    assert {n: p.shape for n, p in nano.named_parameters()} == NANO_SHAPES
    assert nano.config.ffn_hidden == F and nano.config.head_dim == D
    # initialisation of the spec
    p = dict(nano.named_parameters())
    lam = p["layers.0.temporal_mix.lambda_param"].data
    assert lam.min() >= 4.0 and lam.max() <= 9.0 and lam.std() > 0.5
    assert np.all(p["layers.1.temporal_mix.h0"].data == 0) and np.all(p["layers.1.temporal_mix.input_gate_proj.bias"].data == 0)
    assert np.all(p["layers.2.norm1.weight"].data == 1) and np.all(p["norm.weight"].data == 1)
    assert abs(p["embed_tokens.weight"].data.std() - 0.02) < 0.002


def test_file_is_standard_safetensors(nano, nano_file):
    raw = nano_file.read_bytes()
    header, data, n = parse(raw)
    assert (8 + n) % 8 == 0  # the data section starts 8-byte aligned (spaces pad the header)
    meta = header.pop("__metadata__")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert json.loads(meta["config"]) == nano.config.to_dict()
    assert ChimeraConfig.from_dict(json.loads(meta["config"])) == nano.config
    assert "lm_head.weight" not in header  # tied: stored once, as embed_tokens
    assert {k: tuple(v["shape"]) for k, v in header.items()} == NANO_SHAPES
    end = 0
    for name, info in header.items():  # in file order: contiguous, no gaps, no overlap
        assert info["dtype"] == "F32"
        begin, stop = info["data_offsets"]
        assert begin == end, name
        assert stop - begin == 4 * math.prod(info["shape"])
        arr = np.frombuffer(data[begin:stop], dtype="<f4").reshape(info["shape"])
        assert np.array_equal(arr, nano.state_dict()[name]), name
        end = stop
    assert end == len(data)  # nothing after the last tensor


def test_read_handwritten_safetensors(tmp_path):
    f32 = np.array([[1.5, -2.0, 3.25], [0.0, 1e-30, -7.0]], "<f4")
    f64 = np.array([np.pi, -1e300], "<f8")
    f16 = np.array([1.5, -2.25, 65504.0, 6.1035156e-05], "<f2")
    bf16_values = np.array([1.0, -2.5, 3.140625, 1.0e30, -0.0078125], np.float32)
    bf16_values[3] = np.float32(np.uint32(0x7149_0000).view(np.float32))  # some exact bf16 near 1e30
    i32 = np.array([-5, 7, 2**31 - 1], "<i4")
    entries = [  # data deliberately not in name order
        ("z.f32", "F32", f32.shape, f32.tobytes()),
        ("a.bf16", "BF16", (5,), bf16_bits(bf16_values).tobytes()),
        ("m.f16", "F16", (2, 2), f16.tobytes()),
        ("b.f64", "F64", (2,), f64.tobytes()),
        ("c.i32", "I32", (3,), i32.tobytes()),
        ("e.empty", "F32", (0, 3), b""),
    ]
    path = tmp_path / "hand.safetensors"
    path.write_bytes(safetensors_bytes(entries, {"who": "hand", "n": "1"}, pad=False))
    tensors, metadata = tensorfile.read_safetensors(str(path))
    assert metadata == {"who": "hand", "n": "1"}
    assert set(tensors) == {"z.f32", "a.bf16", "m.f16", "b.f64", "c.i32", "e.empty"}
    assert tensors["z.f32"].dtype == np.float32 and np.array_equal(tensors["z.f32"], f32)
    assert tensors["a.bf16"].dtype == np.float32 and tensors["a.bf16"].tobytes() == bf16_values.tobytes()
    assert tensors["m.f16"].shape == (2, 2) and np.array_equal(tensors["m.f16"].astype(np.float32).ravel(),
                                                               f16.astype(np.float32))
    assert tensors["b.f64"].dtype == np.float64 and np.array_equal(tensors["b.f64"], f64)
    assert np.array_equal(tensors["c.i32"], i32)
    assert tensors["e.empty"].shape == (0, 3)
    tensors["z.f32"][0, 0] = 9.0  # returned arrays are ordinary writable arrays


def test_load_converts_bf16_and_f16_checkpoints(nano, tmp_path):
    state = nano.state_dict()
    config = json.dumps(nano.config.to_dict())
    # BF16, written by hand: truncate every float32 to its top 16 bits
    entries, expected = [], {}
    for name, arr in state.items():
        top = (arr.astype("<f4").view("<u4") >> 16).astype("<u2")
        entries.append((name, "BF16", arr.shape, top.tobytes()))
        expected[name] = (top.astype(np.uint32) << 16).view(np.float32)
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(safetensors_bytes(entries, {"config": config}))
    model, _, _ = checkpoint.load(str(path))
    for name, p in model.named_parameters():
        assert p.dtype == np.float32 and np.array_equal(p.data, expected[name]), name
    # F16, through write_safetensors
    half = {k: v.astype(np.float16) for k, v in state.items()}
    path16 = tmp_path / "f16.safetensors"
    tensorfile.write_safetensors(str(path16), half, {"config": config})
    assert parse(path16.read_bytes())[0]["norm.weight"]["dtype"] == "F16"
    model16, _, _ = checkpoint.load(str(path16))
    for name, p in model16.named_parameters():
        assert p.dtype == np.float32 and np.array_equal(p.data, half[name].astype(np.float32)), name


@pytest.mark.parametrize("low", [0x80, 0x4B50], ids=["length_byte0_0x80", "length_bytes_PK"])
def test_header_length_that_looks_like_a_magic_number_still_loads(nano, tmp_path, low):
    """A valid header whose length starts with byte 0x80 (n = 128, 384, ...: 1 in 32 of
    the 8-byte-padded lengths) or with b"PK" (n = 19280, ...) is still safetensors."""
    path = tmp_path / "m.safetensors"
    checkpoint.save(str(path), nano, note="")
    header, _, n = parse(path.read_bytes())
    raw_len = len(json.dumps(header, separators=(",", ":")).encode())  # unpadded length with note=""
    modulus = 256 if low < 256 else 65536
    target = raw_len + (low - raw_len) % modulus  # the smallest length >= raw_len with those low bytes
    # note="x"*k adds k characters to the JSON string inside the metadata string
    checkpoint.save(str(path), nano, note="x" * (target - raw_len))
    raw = path.read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] == target  # the precondition of this test
    assert raw[:1] == b"\x80" or raw[:2] == b"PK"
    model, _, meta = checkpoint.load(str(path))
    assert meta == {"note": "x" * (target - raw_len)}
    assert np.array_equal(model.embed_tokens.weight.data, nano.embed_tokens.weight.data)


# ---------------------------------------------------------------------------
# rejected files: CheckpointError naming the file and the problem

GOOD_ENTRIES = [("a", "F32", (2, 3), np.arange(6, dtype="<f4").tobytes()),
                ("b", "F32", (4,), np.ones(4, "<f4").tobytes())]


def _good():
    return safetensors_bytes(GOOD_ENTRIES, {"k": "v"})


def _header(entries=GOOD_ENTRIES, **changes):
    h, off = {}, 0
    for name, dtype, shape, raw in entries:
        h[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    for name, info in changes.items():
        h[name] = info
    return h


DATA = b"".join(raw for *_, raw in GOOD_ENTRIES)  # 40 bytes
_good_n = struct.unpack("<Q", _good()[:8])[0]

CORRUPT = {
    "empty": (b"", ["8-byte"]),
    "truncated_in_length_3": (_good()[:3], ["8-byte"]),
    "truncated_in_length_7": (_good()[:7], ["8-byte"]),
    "truncated_in_header_start": (_good()[:9], ["exceeds"]),
    "truncated_in_header_middle": (_good()[:8 + _good_n // 2], ["exceeds"]),
    "truncated_in_data_start": (_good()[:8 + _good_n + 1], ["outside"]),
    "truncated_in_data_end": (_good()[:-1], ["outside"]),
    "length_larger_than_file": (struct.pack("<Q", 10**6) + _good()[8:], ["exceeds"]),
    "length_huge": (struct.pack("<Q", 2**63) + _good()[8:], ["header length"]),
    "header_not_json": (raw_file(b'{"a": {"dtype": "F32", ', DATA), ["JSON"]),
    "header_not_utf8": (raw_file(b'{"\xff\xfe": 1}', DATA), ["JSON"]),
    "header_empty": (raw_file(b"", DATA, pad=False), ["JSON"]),
    "header_a_list": (raw_file([1, 2, 3], DATA), ["JSON object"]),
    "header_a_string": (raw_file("a", DATA), ["JSON object"]),
    "entry_not_an_object": (raw_file(_header(a=[1, 2]), DATA), ["'a'"]),
    "entry_missing_offsets": (raw_file(_header(a={"dtype": "F32", "shape": [2, 3]}), DATA), ["'a'", "data_offsets"]),
    "offsets_out_of_range": (raw_file(_header(b={"dtype": "F32", "shape": [4], "data_offsets": [24, 48]}), DATA),
                             ["'b'", "outside"]),
    "offsets_negative": (raw_file(_header(a={"dtype": "F32", "shape": [2, 3], "data_offsets": [-8, 16]}), DATA),
                         ["'a'", "outside"]),
    "offsets_reversed": (raw_file(_header(b={"dtype": "F32", "shape": [0], "data_offsets": [40, 24]}), DATA),
                         ["'b'", "outside"]),
    "offsets_overlap": (raw_file(_header(b={"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}), DATA),
                        ["overlap", "'a'", "'b'"]),
    "size_not_shape_times_dtype": (raw_file(_header(b={"dtype": "F32", "shape": [3], "data_offsets": [24, 40]}), DATA),
                                   ["'b'", "do not hold"]),
    "size_wrong_for_dtype": (raw_file(_header(b={"dtype": "F64", "shape": [4], "data_offsets": [24, 40]}), DATA),
                             ["'b'", "do not hold"]),
    "negative_shape": (raw_file(_header(b={"dtype": "F32", "shape": [-4], "data_offsets": [24, 40]}), DATA), ["'b'"]),
    "unknown_dtype": (raw_file(_header(b={"dtype": "F8_E4M3", "shape": [16], "data_offsets": [24, 40]}), DATA),
                      ["'b'", "dtype"]),
    "metadata_not_strings": (safetensors_bytes(GOOD_ENTRIES, {"config": {"d_model": 64}}), ["__metadata__"]),
    "pickle": (pickle.dumps({"embed_tokens.weight": [1.0, 2.0]}, protocol=4), ["pickle"]),
    "pickle_protocol2": (pickle.dumps([1, 2, 3], protocol=2), ["pickle"]),
    "zip": (b"PK\x03\x04" + b"\x00" * 60, ["zip"]),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_file_is_rejected(tmp_path, name):
    raw, words = CORRUPT[name]
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError) as e:
        tensorfile.read_safetensors(str(path))
    msg = str(e.value)
    assert str(path) in msg, msg
    problem = msg.replace(str(path), "")
    for w in words:
        assert w.lower() in problem.lower(), f"{w!r} not in {msg!r}"
    expect_error(path)  # and load() says the same


def test_shape_whose_size_overflows_int64_is_rejected(tmp_path):
    """[2**33, 2**31] holds 2**64 elements; a product that wraps to 0 must not pass
    the size check (it would then fail in reshape with a bare ValueError)."""
    path = tmp_path / "overflow.safetensors"
    path.write_bytes(raw_file({"a": {"dtype": "F32", "shape": [2**33, 2**31], "data_offsets": [0, 0]}}, b""))
    with pytest.raises(CheckpointError) as e:
        tensorfile.read_safetensors(str(path))
    assert str(path) in str(e.value) and "'a'" in str(e.value).replace(str(path), "")


def test_missing_file_and_directory_are_rejected(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "cannot open")
    expect_error(tmp_path, "cannot open")


class _Boom:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_and_zip_checkpoints_are_never_unpickled(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle a checkpoint")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    marker = tmp_path / "pwned"
    pt = tmp_path / "model.pt"
    pt.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=4))
    assert pt.read_bytes()[:2] == b"\x80\x04"
    zipped = tmp_path / "model.bin"  # the layout of torch.save: a zip holding data.pkl
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Boom(str(marker)), protocol=2))
    assert zipped.read_bytes()[:4] == b"PK\x03\x04"
    for path in (pt, zipped):
        msg = expect_error(path, "pickle")
        assert "safetensors" in msg
        with pytest.raises(CheckpointError):
            tensorfile.read_safetensors(str(path))
    assert not marker.exists()


# model-level problems


def _write_model_file(path, tensors, metadata):
    tensorfile.write_safetensors(str(path), tensors, metadata)
    return path


def test_missing_config_metadata(nano, tmp_path):
    path = _write_model_file(tmp_path / "noconf.safetensors", nano.state_dict(), {"format": "wyrd"})
    expect_error(path, "config")
    path = _write_model_file(tmp_path / "nometa.safetensors", nano.state_dict(), None)
    expect_error(path, "config")


def test_config_with_unknown_field(nano, tmp_path):
    cfg = dict(nano.config.to_dict(), n_experts=8)
    path = _write_model_file(tmp_path / "unk.safetensors", nano.state_dict(), {"config": json.dumps(cfg)})
    expect_error(path, "n_experts", "config")


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"d_model": 65, "n_heads": 4}', '{"n_layers": 0}'])
def test_bad_config_json(nano, tmp_path, bad):
    path = _write_model_file(tmp_path / "badconf.safetensors", nano.state_dict(), {"config": bad})
    expect_error(path, "config")


@pytest.mark.parametrize("field,value", [("tie_word_embeddings", "false"), ("rms_norm_eps", None)])
def test_config_field_of_the_wrong_type(nano, tmp_path, field, value):
    """A string "false" would silently tie the embeddings; a null eps would fail only at
    the first forward pass. Both should be refused where they enter: the loader."""
    cfg = dict(nano.config.to_dict(), **{field: value})
    path = _write_model_file(tmp_path / "types.safetensors", nano.state_dict(), {"config": json.dumps(cfg)})
    expect_error(path, field)


def test_bad_meta_json(nano, tmp_path):
    path = _write_model_file(tmp_path / "badmeta.safetensors", nano.state_dict(),
                             {"config": json.dumps(nano.config.to_dict()), "meta": "{oops"})
    expect_error(path, "meta")


@pytest.mark.parametrize("meta", ["[1]", '"text"', "7", "null", '{"step": 1' + "0" * 5000 + "}"])
def test_meta_that_is_not_a_json_object_is_a_checkpoint_error(nano, tmp_path, meta):
    """Callers read meta as a dict (meta.get("step")); a list there was a TypeError later,
    and an integer beyond Python's 4,300 digits a ValueError out of json."""
    path = _write_model_file(tmp_path / "meta.safetensors", nano.state_dict(),
                             {"config": json.dumps(nano.config.to_dict()), "meta": meta})
    expect_error(path, "meta")
    with pytest.raises(CheckpointError, match="meta"):
        checkpoint.read_meta(str(path))


@pytest.mark.parametrize("field,value", [("sliding_window", 2 ** 40), ("max_seq_len", 2 ** 40),
                                         ("vocab_size", 2 ** 31), ("n_kv_heads", 2 ** 62)])
def test_config_fields_beyond_their_stated_bounds_are_refused_at_load(nano, tmp_path, field, value):
    """A 2**40-token window passed every check (the weights do not depend on it) and then
    failed inside the attention kernel or sized a 2**40-slot decoding ring."""
    cfg = dict(nano.config.to_dict(), **{field: value})
    path = _write_model_file(tmp_path / "big.safetensors", nano.state_dict(), {"config": json.dumps(cfg)})
    expect_error(path, field, f"{wyrd.LIMITS[field]:,}")


def test_config_with_an_integer_beyond_pythons_digit_limit(nano, tmp_path):
    text = json.dumps(nano.config.to_dict()).replace('"n_layers": 3', '"n_layers": 3' + "0" * 5000)
    path = _write_model_file(tmp_path / "digits.safetensors", nano.state_dict(), {"config": text})
    expect_error(path, "config")


@pytest.mark.parametrize("program", ["train", "chat"])
def test_crafted_init_checkpoints_give_one_line_errors_in_train_and_chat(nano, tmp_path, program):
    """The programs a user points at a file: one line naming it, exit code 2."""
    from tokenizer import Tokenizer
    tok = Tokenizer.train(["a tiny story about a cat. " * 20], 300)
    files = {"window": dict(config=json.dumps(dict(nano.config.to_dict(), sliding_window=2 ** 40))),
             "meta": dict(config=json.dumps(nano.config.to_dict()), meta="[1]")}
    root = Path(__file__).resolve().parents[1]
    for name, metadata in files.items():
        path = _write_model_file(tmp_path / f"{name}.safetensors", nano.state_dict(),
                                 dict(metadata, tokenizer=tok.to_json()))
        args = ([str(root / "train.py"), "finetune", "--data", "builtin:20", "--init", str(path), "--steps", "1",
                 "--out", str(tmp_path / f"{name}-out.safetensors")] if program == "train"
                else [str(root / "chat.py"), "--checkpoint", str(path), "--prompt", "hi", "--max-tokens", "2"])
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and str(path) in lines[0], (name, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr


def test_weights_not_matching_config(nano, tmp_path):
    config = {"config": json.dumps(nano.config.to_dict())}
    missing = nano_tensors(nano)
    del missing["layers.1.temporal_mix.lambda_param"]
    expect_error(_write_model_file(tmp_path / "missing.safetensors", missing, config),
                 "layers.1.temporal_mix.lambda_param", "missing")
    wrong = nano_tensors(nano)
    wrong["layers.2.temporal_mix.k_proj.weight"] = np.zeros((64, 64), np.float32)
    expect_error(_write_model_file(tmp_path / "wrong.safetensors", wrong, config),
                 "layers.2.temporal_mix.k_proj.weight", "(32, 64)", "(64, 64)")
    extra = nano_tensors(nano)
    extra["layers.0.temporal_mix.q_proj.weight"] = np.zeros((64, 64), np.float32)
    expect_error(_write_model_file(tmp_path / "extra.safetensors", extra, config),
                 "layers.0.temporal_mix.q_proj.weight", "unexpected")



@pytest.mark.parametrize("field, value", [("n_layers", 1 << 10), ("d_model", 1 << 16), ("vocab_size", 1 << 21)])  # in bounds
def test_a_config_that_implies_more_weights_than_the_file_holds_is_refused_before_allocating(
        nano, tmp_path, field, value, monkeypatch):
    config = dict(nano.config.to_dict(), **{field: value})
    if field == "d_model":
        config.update(n_heads=1, n_kv_heads=1)
    path = _write_model_file(tmp_path / "crafted.safetensors", nano_tensors(nano), {"config": json.dumps(config)})
    monkeypatch.setattr(wyrd.Chimera, "__init__", lambda *a, **k: pytest.fail("built a model"))
    expect_error(path, "the config implies at least", "weights but the file holds")


def test_a_header_too_large_or_of_too_many_tensors_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import time
    import tensorfile
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(tensorfile.MAX_TENSORS + 1)}
    path = tmp_path / "many.safetensors"
    path.write_bytes(raw_file(many, b""))                # ~4.5 MB: 65,537 empty tensors
    start = time.perf_counter()
    expect_error(path, "more than 65,536 tensors")
    assert time.perf_counter() - start < 1.0            # counted in the raw bytes, not parsed
    monkeypatch.setattr(tensorfile, "MAX_HEADER", 1000)  # the real cap, 32 MB, as a 1 KB one
    path = tmp_path / "long.safetensors"
    path.write_bytes(raw_file({"__metadata__": {"note": "x" * 2000}}, b""))
    expect_error(path, "bytes; expected at most 1,000")


def test_integer_weights_infinite_offsets_and_rope_theta_are_refused(nano, tmp_path):
    config = {"config": json.dumps(nano.config.to_dict())}
    ints = {n: t.view(np.int32) for n, t in nano_tensors(nano).items()}   # F32 bytes labelled I32
    expect_error(_write_model_file(tmp_path / "ints.safetensors", ints, config), "floating point", "int32")
    path = tmp_path / "inf_offset.safetensors"
    path.write_bytes(raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}, b"\0" * 4))
    expect_error(path, "corrupted header entry 'a'")
    theta = {"config": json.dumps(dict(nano.config.to_dict(), rope_theta=float("inf")))}
    expect_error(_write_model_file(tmp_path / "theta.safetensors", nano_tensors(nano), theta),
                 "rope_theta must be a positive finite number")


def test_nan_weights_load_with_a_warning(nano, tmp_path, capsys):
    tensors = nano_tensors(nano)
    tensors["norm.weight"] = tensors["norm.weight"].copy()
    tensors["norm.weight"][3] = np.nan
    path = _write_model_file(tmp_path / "nan.safetensors", tensors, {"config": json.dumps(nano.config.to_dict())})
    model = checkpoint.load(str(path))[0]
    assert np.isnan(model.norm.weight.data[3])
    err = capsys.readouterr().err
    assert str(path) in err and "NaN or Inf" in err and "norm.weight" in err
    checkpoint.save(str(tmp_path / "ok.safetensors"), nano)
    checkpoint.load(str(tmp_path / "ok.safetensors"))
    assert "NaN" not in capsys.readouterr().err
    # an F64 value past float32's range is inf once loaded: reported as one
    tensors = {name: a.astype(np.float64) for name, a in nano_tensors(nano).items()}
    tensors["norm.weight"][3] = 1e300
    path = _write_model_file(tmp_path / "big.safetensors", tensors, {"config": json.dumps(nano.config.to_dict())})
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # and NumPy's own overflow warning stays quiet
        model = checkpoint.load(str(path))[0]
    assert model.norm.weight.data[3] == np.inf and "NaN or Inf" in capsys.readouterr().err


def test_deeply_nested_json_in_a_header_or_its_metadata_is_a_checkpoint_error(nano, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep_header.safetensors"
    path.write_bytes(raw_file(deep.encode(), b""))
    expect_error(path, "not valid JSON")
    for key in ("config", "meta", "tokenizer"):
        metadata = {"config": json.dumps(nano.config.to_dict()), key: deep}
        expect_error(_write_model_file(tmp_path / f"deep_{key}.safetensors", nano_tensors(nano), metadata), key)
    tok_file = tmp_path / "tokenizer.json"
    tok_file.write_text(deep)
    from tokenizer import Tokenizer, TokenizerError
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.load(str(tok_file))

def test_tied_lm_head_written_by_another_tool(nano, tmp_path):
    config = {"config": json.dumps(nano.config.to_dict())}
    same = dict(nano_tensors(nano), **{"lm_head.weight": nano.embed_tokens.weight.data.copy()})
    model, _, _ = checkpoint.load(str(_write_model_file(tmp_path / "tied.safetensors", same, config)))
    assert np.array_equal(model.embed_tokens.weight.data, nano.embed_tokens.weight.data)
    differs = dict(same, **{"lm_head.weight": nano.embed_tokens.weight.data + 1})
    expect_error(_write_model_file(tmp_path / "untied.safetensors", differs, config), "lm_head")


# ---------------------------------------------------------------------------
# atomic writes


def test_save_leaves_no_temporary_files(nano, tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint.save(str(path), nano)
    checkpoint.save(str(path), nano, step=2)  # overwriting too
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert checkpoint.load(str(path))[2] == {"step": 2}


def test_failed_write_keeps_the_previous_file(nano, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    checkpoint.save(str(path), nano, step=1)
    before = path.read_bytes()
    calls = []

    def failing_memoryview(obj):  # the third tensor's bytes never arrive: disk full
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return memoryview(obj)
    monkeypatch.setattr(tensorfile, "memoryview", failing_memoryview, raising=False)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(str(path), nano, step=2)
    assert len(calls) == 3  # it did fail midway through the data
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]

    def failing_fsync(fd):  # everything written, then the flush to disk fails
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        checkpoint.save(str(path), nano, step=3)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert checkpoint.load(str(path))[2] == {"step": 1}


def test_write_rejects_unstorable_values(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match="dtype"):
        tensorfile.write_safetensors(str(path), {"a": np.zeros(2, dtype=bool)})
    with pytest.raises(CheckpointError, match="metadata"):
        tensorfile.write_safetensors(str(path), {"a": np.zeros(2, np.float32)}, {"step": 3})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# load_state_dict, get_config, ChimeraConfig


def test_load_state_dict_is_strict_and_names_every_problem():
    m = Chimera("nano", seed=1)
    before = {k: v.copy() for k, v in m.state_dict().items()}
    state = {k: v + 1 for k, v in Chimera("nano", seed=2).state_dict().items()}
    del state["layers.0.ffn.w3.weight"]
    state["layers.9.ffn.w1.weight"] = np.zeros((256, 64), np.float32)
    state["norm.weight"] = np.ones(63, np.float32)
    with pytest.raises(ValueError) as e:
        m.load_state_dict(state)
    msg = str(e.value)
    for word in ("layers.0.ffn.w3.weight", "layers.9.ffn.w1.weight", "norm.weight", "(64,)", "(63,)",
                 "missing", "unexpected", "shape"):
        assert word in msg, f"{word!r} not in {msg!r}"
    # nothing was half-loaded
    for k, v in m.state_dict().items():
        assert np.array_equal(v, before[k]), k


def test_load_state_dict_copies_values():
    m = Chimera("nano", seed=1)
    state = {k: v * 2 for k, v in Chimera("nano", seed=2).state_dict().items()}  # float32
    expected = {k: v.copy() for k, v in state.items()}
    m.load_state_dict(state)
    for k, v in m.state_dict().items():
        assert v.dtype == np.float32 and np.array_equal(v, expected[k]), k
    state["embed_tokens.weight"][:] = 0  # the model holds its own copy, not the caller's array
    assert np.array_equal(m.embed_tokens.weight.data, expected["embed_tokens.weight"])
    # float64 values are converted to the model's dtype
    m.load_state_dict({k: v.astype(np.float64) / 3 for k, v in expected.items()})
    w = m.embed_tokens.weight.data
    assert w.dtype == np.float32 and np.array_equal(w, (expected["embed_tokens.weight"].astype(np.float64) / 3).astype(np.float32))


def test_get_config_unknown_name_lists_presets():
    assert get_config("nano").d_model == 64
    with pytest.raises(ValueError) as e:
        get_config("gigantic")
    msg = str(e.value)
    assert "gigantic" in msg
    for name in ("nano", "micro", "tiny", "small", "medium", "base", "large"):
        assert name in msg


def test_config_validation_messages():
    with pytest.raises(ValueError, match="d_model 65 is not divisible by n_heads 4"):
        ChimeraConfig(d_model=65, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="n_heads 6 is not divisible by n_kv_heads 4"):
        ChimeraConfig(d_model=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"n_layers must be an integer in \[1, 1,024\]"):
        ChimeraConfig(n_layers=0)
    with pytest.raises(ValueError, match="unknown config field"):
        ChimeraConfig.from_dict({"d_model": 64, "n_heads": 4, "dropout": 0.1})
    ChimeraConfig(d_model=96, n_heads=6, n_kv_heads=3)  # a valid odd-looking one


# ---------------------------------------------------------------------------
# parameter counts, from the spec's parameter table


def count_params(cfg):
    """The spec's table: per layer two norms and a SwiGLU FFN, plus the mixer's weights."""
    d, f, V = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size
    H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    recurrent = 4 * d * d + 2 * d + d + d + d       # 4 [d, d] weights; 2 gate biases, lambda, h0, norm
    attention = H * D * d + 2 * KV * D * d + d * H * D
    total = V * d + d                                # embedding and final norm
    for i in range(cfg.n_layers):
        total += 2 * d + 3 * d * f
        total += attention if (i + 1) % cfg.attention_every_n == 0 else recurrent
    if not cfg.tie_word_embeddings:
        total += V * d
    return total


def test_parameter_counts_of_the_reference_presets():
    assert count_params(get_config("small")) == 106_414_848
    assert count_params(get_config("medium")) == 230_514_688
    medium = get_config("medium")
    assert medium.ffn_hidden == 2816 and get_config("small").ffn_hidden == 2048
    assert [i for i in range(16) if medium.is_attention(i)] == [2, 5, 8, 11, 14]


def test_parameter_count_formula_matches_the_code():
    nano = get_config("nano")
    assert Chimera(nano).num_params() == count_params(nano) == sum(math.prod(s) for s in NANO_SHAPES.values())
    untied = ChimeraConfig(**dict(nano.to_dict(), tie_word_embeddings=False, n_layers=4))
    assert Chimera(untied).num_params() == count_params(untied) == count_params(nano) + 64 * 2 + 3 * 64 * 256 \
        + 4 * 64 * 64 + 5 * 64 + 512 * 64


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["Once upon a time there was a cat.", "user\nHi!"] * 4, 300)


def bf16_nearest_even(x):
    """The bfloat16 nearest to each float32, ties to the even mantissa, chosen by comparing
    distances in float64 (independent of tensorfile.bf16_bits' add-and-truncate) -> uint16 bits."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    down = bits & np.uint32(0xFFFF0000)                  # toward zero
    up = down + np.uint32(0x10000)                       # the next bfloat16 away from zero
    x64 = bits.view(np.float32).astype(np.float64)
    d_down = np.abs(x64 - down.view(np.float32).astype(np.float64))
    d_up = np.abs(up.view(np.float32).astype(np.float64) - x64)
    take_up = (d_up < d_down) | ((d_up == d_down) & ((down >> 16) & 1 == 1))
    return np.where(take_up, up >> 16, down >> 16).astype(np.uint16)


def test_bf16_rounding_is_nearest_even():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000),
                             rng.standard_normal(1000) * 0.02]).astype(np.float32)
    ties = ((rng.integers(0, 0x7F00, 2000).astype(np.uint32) << 16) | 0x8000).view(np.float32)  # exactly halfway
    ties = np.concatenate([ties, -ties])
    for x in (values, ties):
        assert np.array_equal(tensorfile.bf16_bits(x), bf16_nearest_even(x))
    assert (((tensorfile.bf16_bits(ties[:2000]) & 1) == 0)).all()               # halfway goes to even
    back = (tensorfile.bf16_bits(np.array([np.nan, -np.nan, np.inf, -np.inf], np.float32)).astype(np.uint32) << 16)
    back = back.view(np.float32)
    assert np.isnan(back[:2]).all() and list(back[2:]) == [np.inf, -np.inf]


def test_save_bf16_halves_the_file_and_loads_as_float32(nano, tok, tmp_path):
    f32, bf16 = tmp_path / "f32.safetensors", tmp_path / "bf16.safetensors"
    checkpoint.save(str(f32), nano, tok)
    checkpoint.save(str(bf16), nano, tok, dtype="bf16")
    header, data, _ = parse(bf16.read_bytes())
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    weights = sum(p.size for p in nano.parameters())
    assert len(parse(f32.read_bytes())[1]) == 4 * weights and len(data) == 2 * weights
    model, tok2, _ = checkpoint.load(str(bf16))
    assert tok2.to_json() == tok.to_json()
    for name, p in model.named_parameters():
        expected = (bf16_nearest_even(nano.state_dict()[name]).astype(np.uint32) << 16).view(np.float32)
        assert p.dtype == np.float32 and np.array_equal(p.data, expected), name
    with pytest.raises(ValueError, match="dtype must be 'f32', 'bf16' or 'int8'"):
        checkpoint.save(str(tmp_path / "x.safetensors"), nano, tok, dtype="f16")


def test_a_bf16_file_opens_in_safetensors(nano, tok, tmp_path):
    safetensors = pytest.importorskip("safetensors")  # only this cross-check needs it
    path = tmp_path / "bf16.safetensors"
    checkpoint.save(str(path), nano, tok, dtype="bf16")
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(nano.state_dict())
        for name, arr in nano.state_dict().items():
            s = f.get_slice(name)
            assert s.get_dtype() == "BF16" and list(s.get_shape()) == list(arr.shape), name
        assert json.loads(f.metadata()["config"]) == nano.config.to_dict()
