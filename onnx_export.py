"""ONNX serving without optimum: export an export folder's text body with torch's own exporter, quantise it, run it.

    python export.py onnx PATH            # PATH/onnx/model.onnx (fp32) + PATH/onnx/model_qint8_avx512_vnni.onnx (int8)

Why no optimum: sentence-transformers' own ONNX path (`backend="onnx"`, `export_dynamic_quantized_onnx_model`) needs
optimum-onnx, whose only release (0.1.0) pins transformers < 4.58 and would downgrade the transformers 5 that
sentence-transformers 6 needs (README "ONNX serving"). So the graph is written here with `torch.onnx.export` and the
int8 copy with onnxruntime's own `quantize_dynamic`, in the files and with the inputs / outputs that the backend reads
(sentence_transformers/backend/load.py -> optimum ORTModelForFeatureExtraction): `onnx/model.onnx`, inputs
`input_ids` and `attention_mask` (int64, (batch, sequence)), output `last_hidden_state` (batch, sequence, hidden);
pooling, the Dense head and Normalize stay the folder's sentence-transformers modules. The int8 file carries the name
sentence-transformers gives its dynamic avx512_vnni quantisation (`model_qint8_avx512_vnni.onnx`).

Exporter: the dynamo-based `torch.onnx.export(..., dynamo=True)` (torch 2.13's default; it needs onnxscript, which
installs beside transformers 5). It exports `F.scaled_dot_product_attention(enable_gqa=True)` and keeps batch and
sequence symbolic; the TorchScript exporter (dynamo=False) has no symbolic for SDPA's enable_gqa and is deprecated.

`OnnxEncoder(PATH)` is the runtime for users without optimum or torch models: our tokenizer (tokenizer.json, the
instruction prompt as JasperModel.encode), the ONNX body through onnxruntime, then the masked mean, a Dense head
(`2_Dense_{D}`) and L2 normalisation, exactly JasperModel.pool / project. It speaks eval.py's encoder protocol
(`encode(texts, dim, instruction, batch_size)`), so `eval.quick_eval(OnnxEncoder(PATH), ...)` scores the ONNX file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from checkpoints import (CheckpointError, check_standard_folder, dense_dir, make_readable, read_dense_folder,
                         resolve_checkpoint, standard_heads)
from model import JasperConfig, JasperModel, Qwen2Encoder, mean_pool
from tokenizer import TextTokenizer
from packing import length_sorted_encode

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"                     # sentence-transformers' ONNX_WEIGHTS_NAME, under onnx/
INT8_FILE = "model_qint8_avx512_vnni.onnx"   # its name for export_dynamic_quantized_onnx_model(..., "avx512_vnni")
OPSET = 18


class OnnxBody(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state: Qwen2Encoder.forward for right-padded, bidirectional input,
    with the mask always built (the eager path skips it when nothing is padded: a data-dependent branch an exported
    graph cannot keep, and the same numbers either way)."""

    def __init__(self, body: Qwen2Encoder):
        super().__init__()
        if body.config.causal:
            raise CheckpointError("the ONNX export covers bidirectional students (causal false); this body is causal")
        self.body = body

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        b = self.body
        x = b.embed_tokens(input_ids)                                     # (B, T, H)
        cos, sin = b.rope(x.shape[1], x.device, x.dtype)                  # (T, hd)
        keep = attention_mask.bool()                                      # (B, T)
        # an all-padding row attends to everything (finite garbage, pooling ignores it), as attention_mask_for_sdpa
        keep = keep | ~keep.any(dim=1, keepdim=True)
        mask = keep[:, None, None, :]                                     # (B, 1, 1, T) key padding
        for layer in b.layers:
            x = layer(x, cos, sin, mask, False)
        return b.norm(x)                                                  # (B, T, H)


def _export_fp32(model: JasperModel, file: Path) -> None:
    """torch.onnx.export (dynamo) of OnnxBody with symbolic batch and sequence; weights inline under 2 GB (one file),
    else in `model.onnx.data` beside it (protobuf's 2 GB limit; onnxruntime and optimum read both)."""
    body = OnnxBody(model.model).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]], dtype=torch.long)   # (2, 4): a padded example batch
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    big = sum(p.numel() * p.element_size() for p in body.parameters()) > 1.8 * 2 ** 30
    with torch.no_grad():
        prog = torch.onnx.export(body, (ids, mask), input_names=["input_ids", "attention_mask"],
                                 output_names=["last_hidden_state"], opset_version=OPSET, dynamo=True,
                                 dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                                 external_data=big, verbose=False)
    prog.save(str(file), external_data=big)


def _quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (onnxruntime.quantization.quantize_dynamic): weights int8 per output channel, symmetric;
    activations quantised per batch at run time, so no calibration data. avx512_vnni's settings in optimum's
    AutoQuantizationConfig (per_channel, no reduce_range)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                     use_external_data_format=(src.parent / (src.name + ".data")).is_file())


def export_onnx(path: str | os.PathLike, quantize: bool = True) -> Path:
    """PATH/onnx/{model.onnx, model_qint8_avx512_vnni.onnx} for the export folder PATH (checked first). The onnx/
    folder is written into a temporary sibling and renamed into place when complete (a kill leaves the old one)."""
    path = resolve_checkpoint(path)
    check_standard_folder(path)  # tokenizer, heads and modules: what the runtime and sentence-transformers read
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter's graph builder)
    except ImportError as e:
        raise CheckpointError(f"ONNX export needs the optional packages onnx, onnxscript and onnxruntime "
                              f"(pip install onnx onnxscript onnxruntime; requirements-test.txt): {e}") from None
    model = JasperModel.from_pretrained(path, dtype=torch.float32, vision=False)  # fp32: parity and int8 source
    out = path / ONNX_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{ONNX_DIR}.tmp-", dir=path))
    try:
        _export_fp32(model, tmp / FP32_FILE)
        if quantize:
            _quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE)
        make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class OnnxEncoder:
    """An export folder's ONNX file through onnxruntime + our tokenizer, pooling and heads (JasperModel.encode's
    vectors without torch modules). `file`: model.onnx (fp32) or model_qint8_avx512_vnni.onnx (int8)."""

    encodes_many_dims = True  # one body pass for several heads (eval.EmbeddingCache uses it)

    def __init__(self, path: str | os.PathLike, file: str = FP32_FILE, threads: int | None = None,
                 max_length: int | None = None):
        import onnxruntime as ort
        path = resolve_checkpoint(path)
        onnx_file = path / ONNX_DIR / file
        if not onnx_file.is_file():
            raise CheckpointError(f"{onnx_file}: no such file (python export.py onnx {path})")
        cfg = JasperConfig.from_hf(path / "config.json")
        self.max_length = max_length or cfg.max_length
        self.tokenizer = TextTokenizer.from_pretrained(path, max_length=self.max_length)
        # {D: (weight (D, H), bias (D,) or None)} from the folder's Dense modules: the same tensors as vector_linear_D
        self.heads = {D: read_dense_folder(path / dense_dir(D)) for D in standard_heads(path)}
        self.dims = tuple(self.heads)  # largest first, as JasperModel.dims
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
        self.session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.name = f"{path.name}-onnx-{Path(file).stem}"

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        (h,) = self.session.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in self.input_names})
        return torch.from_numpy(h)                                                    # (B, T, H) fp32

    def project(self, pooled: Tensor, dims: Sequence[int]) -> dict[int, Tensor]:
        out = {}
        for D in dims:
            w, b = self.heads[D]
            y = pooled @ w.float().T + (b.float() if b is not None else 0)              # (B, D)
            out[D] = torch.nn.functional.normalize(y, p=2, dim=-1)
        return out

    def encode(self, texts: Sequence[str], dim: int | Sequence[int] | None = None, instruction: str | None = None,
               batch_size: int = 32, show_progress: bool | None = None,
               max_length: int | None = None) -> Tensor | dict[int, Tensor]:
        """As JasperModel.encode for texts: L2-normalised (N, dim) fp32, or {D: (N, D)} for a list of dims."""
        many = dim is not None and not isinstance(dim, int)
        dims = list(dim) if many else [self.dims[0] if dim is None else dim]
        bad = [D for D in dims if D not in self.heads]
        if bad:
            raise ValueError(f"no head of dim {bad[0]}; this model has {self.dims}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer.encode_ids(texts, instruction, max_length or self.max_length)

        def batch(idx: list[int]) -> dict[int, Tensor]:
            input_ids, mask = self.tokenizer.pad([ids[i] for i in idx])                  # (b, T) right-padded
            return self.project(mean_pool(self.hidden(input_ids, mask), mask), dims)    # {D: (b, D)}
        out = length_sorted_encode([len(x) for x in ids], dims, batch_size, batch, desc="encode onnx", unit="texts",
                                   enabled=len(ids) > 1000 if show_progress is None else show_progress)
        return out if many else out[dims[0]]
