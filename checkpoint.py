"""Checkpoints: a Chimera model, its config and its tokenizer in one safetensors
file (tensorfile.py), the weights under the names of docs/architecture.md §2.

    checkpoint.save("out/m.safetensors", model, tokenizer, step=100)
    model, tokenizer, meta = checkpoint.load("out/m.safetensors")

__metadata__ holds "format": "wyrd", the "config" and the "tokenizer" as JSON
strings, and "meta" (a JSON object: the step, what the run was, anything the caller
passes to save). An int8 file (save(dtype="int8")) adds "quantization" (quant.py).
"""
import json
import math
import sys

import numpy as np

import quant
import tensorfile
from tensorfile import CheckpointError, SafetensorsFile, read_safetensors, shape_mismatch
from wyrd import Chimera, ChimeraConfig


def save(path, model, tokenizer=None, dtype="f32", **meta):
    """One self-describing file: the weights under the spec's names (a tied lm_head
    is not stored), the config and the tokenizer as JSON strings in __metadata__.
    dtype="bf16" halves the file (standard BF16 tensors; `load` gives float32 back).
    dtype="int8" stores an int8 model (a float one is quantised as it is saved) in a
    quarter of float32's bytes, for `load(path, quantize="int8")`: each matrix's int8
    rows as `<name>.weight` (I8) and its scales as `<name>.weight_scale` (F32, one per
    64 inputs: quant.py), every other parameter as F32, and __metadata__['quantization']."""
    if dtype not in ("f32", "bf16", "int8"):
        raise ValueError(f"dtype must be 'f32', 'bf16' or 'int8', got {dtype!r}")
    if model.quantized and dtype != "int8":
        raise ValueError(f"{path}: this model has {model.quantized} weights: save it with dtype='int8', "
                         "or save the float model")
    metadata = {"format": "wyrd", "config": json.dumps(model.config.to_dict())}
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.to_json()
    if meta:
        metadata["meta"] = json.dumps(meta)
    if dtype == "int8":
        metadata["quantization"] = json.dumps(quant.INT8_FILE)
        model = model if model.quantized else quant.quantize(model)
    tensors = model.state_dict()                                        # an int8 model's: its float parameters
    for name, m in quant.int8_named_matrices(model) if dtype == "int8" else ():
        tensors[name + ".weight"], tensors[name + ".weight_scale"] = m.q, m.scale
        if m.bias is not None:
            tensors[name + ".bias"] = m.bias
    tensorfile.write_safetensors(path, tensors, metadata, bf16=dtype == "bf16")  # via the module: a test can kill a run here


def _json_of(path, metadata, key, default):
    try:
        return json.loads(metadata.get(key, default))
    except (ValueError, RecursionError) as e:  # ValueError: also an integer over Python's 4,300 digits
        raise CheckpointError(f"{path}: bad __metadata__['{key}']: {e}") from None


def _config_of(path, metadata):
    if "config" not in metadata:
        raise CheckpointError(f"{path}: no model config in __metadata__['config']; was it written by wyrd?")
    d = _json_of(path, metadata, "config", "")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: __metadata__['config'] must be a JSON object, got {type(d).__name__}")
    try:
        return ChimeraConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config in __metadata__: {e}") from None


def read_config(path):
    """The ChimeraConfig of a checkpoint, from its header alone (no weights are read)."""
    return _config_of(path, read_safetensors(path, data=False)[1])


def _tokenizer_of(path, metadata):
    if "tokenizer" not in metadata:
        return None
    from tokenizer import Tokenizer, TokenizerError  # only when a file holds one: decoding-only users skip it
    try:
        return Tokenizer.from_json(metadata["tokenizer"], source=f"{path} __metadata__['tokenizer']")
    except TokenizerError as e:
        raise CheckpointError(f"{path}: bad tokenizer in __metadata__: {e}") from None


def read_tokenizer(path):
    """The tokenizer of a checkpoint (None if it holds none), from its header alone."""
    return _tokenizer_of(path, read_safetensors(path, data=False)[1])


def read_meta(path, metadata=None):
    """The meta dict a checkpoint was saved with ({} if none), from its header alone."""
    metadata = read_safetensors(path, data=False)[1] if metadata is None else metadata
    meta = _json_of(path, metadata, "meta", "{}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__['meta'] must be a JSON object, got {type(meta).__name__}")
    return meta


def load(path, dtype=np.float32, quantize=None):
    """-> (model, tokenizer or None, meta dict). The model is built in `dtype` whatever
    the file stores (float32 by default, also from a float64 or bf16 file).
    quantize="int8" gives the inference model of `quant.quantize`, quantised as it is
    read: the float32 model never exists in memory. An int8 file (save(dtype="int8"))
    needs quantize="int8" and is read as stored."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    with SafetensorsFile(path) as f:
        config = _config_of(path, f.metadata)
        meta = read_meta(path, f.metadata)
        int8_file = "quantization" in f.metadata
        if int8_file:
            quant.check_int8_file(path, f.metadata["quantization"], quantize)
        shapes = {name: shape for name, (_, _, shape, _) in f.tensors.items()}
        labels = {name: label for name, (_, _, _, label) in f.tensors.items()}
        not_float = [name for name, (_, dt, _, label) in f.tensors.items()
                     if label != "BF16" and dt.kind != "f" and not (int8_file and label == "I8")]
        if not_float:
            raise CheckpointError(f"{path}: weights must be floating point (F32, F16, BF16 or F64"
                                  f"{'; I8 in an int8 file' if int8_file else ''}); "
                                  f"{not_float[0]} is {f.tensors[not_float[0]][1]}")
        # before allocating: a header's config must not imply more weights than the file holds
        # (embedding + the FFNs alone are a lower bound), or n_layers=10**9 in a small file
        # would build a model without bound
        implied = config.vocab_size * config.d_model + config.n_layers * 3 * config.d_model * config.ffn_hidden
        stored = sum(math.prod(shape) for shape in shapes.values())
        if implied > stored:
            raise CheckpointError(f"{path}: the config implies at least {implied:,} weights but the file holds "
                                  f"{stored:,}: truncated, or the config does not belong to these tensors")
        if config.tie_word_embeddings and "lm_head.weight" in shapes and "embed_tokens.weight" in shapes \
                and not int8_file:
            if not np.array_equal(f.read("lm_head.weight"), f.read("embed_tokens.weight")):
                raise CheckpointError(f"{path}: config ties lm_head to embed_tokens but lm_head.weight differs")
            del shapes["lm_head.weight"]  # a tied copy written by another tool
        model = Chimera(config, dtype=dtype, init=None)
        params = {n: p.shape for n, p in model.named_parameters()} | (quant.scale_shapes(model) if int8_file else {})
        problem = shape_mismatch(params, shapes)
        if problem:
            raise CheckpointError(f"{path}: weights do not match the config: {problem}")
        matrices = {name + ".weight" for name, _ in quant.int8_named_matrices(model)}
        misfiled = [name for name in shapes if (labels[name] == "I8") != (name in matrices)
                    or name.endswith(".weight_scale") and labels[name] != "F32"] if int8_file else []
        if misfiled:
            raise CheckpointError(f"{path}: {misfiled[0]} is {labels[misfiled[0]]}, but an int8 file stores the "
                                  "matrices' weights as I8, their scales as F32 and everything else as floats")
        try:
            bad_values = _fill(model, f.read, quantize, int8_file)
        except ValueError as e:  # values an int8 file never holds
            raise CheckpointError(f"{path}: {e}") from None
    if bad_values:  # loadable (to inspect it), but say so: it will produce NaN
        print(f"warning: {path}: {len(bad_values)} tensor(s) hold NaN or Inf values, e.g. {bad_values[0]}",
              file=sys.stderr)
    return model, _tokenizer_of(path, f.metadata), meta


def _fill(model, read, quantize=None, int8_file=False):
    """Fill a Chimera(init=None) from read(name, start, stop) -> rows, a block at a
    time, so loading holds no second copy of the model; quantize="int8" replaces each
    matrix by its int8 form as it is read (int8_file: read as stored, with its
    scales). -> names of tensors holding NaN/Inf."""
    bad_values = []

    def blocks(name, shape):  # (first row, rows) of about 256 KB; floats as the model's dtype
        step = max(1, (1 << 16) // max(1, math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            block = read(name, start, start + step)
            if block.dtype.kind == "f":
                with np.errstate(over="ignore"):  # an F64 1e300 becomes inf here, and is reported as such
                    block = block.astype(model.dtype, copy=False)
                if not np.isfinite(block).all() and name not in bad_values:
                    bad_values.append(name)
            yield start, block

    if quantize == "int8":
        quant.fill_int8(model, blocks, int8_file)
    for name, p in model.named_parameters():  # an int8 model's: the float ones left
        for start, block in blocks(name, p.shape):
            p.data[start:start + len(block)] = block
    if quantize == "int8":
        model.int8 = quant.Int8Decoder(model)
    return bad_values
