"""ONNX serving without optimum (issue 28, item 4): `python export.py onnx PATH` writes the graph and file names that
sentence-transformers' ONNX backend reads, and onnxruntime on it gives JasperModel.encode's vectors at every head
(<= 1e-4, fp32) on padded batches of mixed lengths; the int8 copy is quantised and close."""
from __future__ import annotations

import pytest
import torch

import export as X
import onnx_export as O
from common import minilm_dir, qwen_tokenizer_dir
from test_export import _tiny

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# mixed lengths, so every batch of 3 pads: 1-token to ~24-token texts (the students cut at 24)
TEXTS = ["x", "A man is playing a guitar.", "short one", "Stella and Jasper are embedding models; this sentence is "
         "long enough to be cut at the maximum length of twenty-four tokens.", "a b c d e f g", "hello world", "?"]
TOL = 1e-4


@pytest.fixture(scope="module", params=["qwen", "wordpiece"])
def exported(request, tmp_path_factory):
    model = (_tiny(qwen_tokenizer_dir()) if request.param == "qwen"
             else _tiny(minilm_dir(), head_dims=(64, 24)))
    out = model.save_pretrained(tmp_path_factory.mktemp("onnx") / "final")
    assert X.main(["onnx", str(out)]) == 0  # the CLI, as a user runs it
    return out, model


def test_graph_is_what_sentence_transformers_reads(exported):
    out, model = exported
    assert sorted(p.name for p in (out / "onnx").iterdir()) == [O.FP32_FILE, O.INT8_FILE]
    g = onnx.load(str(out / "onnx" / O.FP32_FILE)).graph
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert list(ins) == ["input_ids", "attention_mask"]
    for dims in ins.values():  # symbolic batch and sequence: any batch, any length
        assert len(dims) == 2 and all(isinstance(d, str) and d for d in dims)
    (o,) = g.output
    od = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
    assert o.name == "last_hidden_state" and od[2] == model.config.text.hidden_size and isinstance(od[1], str)
    q = onnx.load(str(out / "onnx" / O.INT8_FILE)).graph
    assert any("Integer" in n.op_type or "Quantize" in n.op_type for n in q.node)  # int8 kernels in the graph


def test_onnxruntime_matches_encode_every_head(exported):
    out, model = exported
    enc = O.OnnxEncoder(out)
    for instr in (None, "Retrieve semantically similar text."):
        got = enc.encode(TEXTS, dim=list(model.dims), instruction=instr, batch_size=3)
        want = model.encode(TEXTS, dim=list(model.dims), instruction=instr, batch_size=3)
        for D in model.dims:
            assert got[D].shape == (len(TEXTS), D)
            assert (got[D] - want[D]).abs().max().item() <= TOL, (D, instr)
    # one text alone (no padding) and the default head
    assert (enc.encode(["A man is playing a guitar."]) - model.encode(["A man is playing a guitar."])).abs().max() \
        <= TOL


def test_int8_is_close_but_quantised(exported):
    out, model = exported
    q = O.OnnxEncoder(out, O.INT8_FILE).encode(TEXTS, batch_size=3)
    want = model.encode(TEXTS, batch_size=3)
    cos = (q * want).sum(-1)  # both unit rows
    assert cos.min().item() >= 0.98 and (q - want).abs().max().item() > TOL


def test_onnx_refusals(tmp_path, capsys):
    assert X.main(["onnx", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    with pytest.raises(Exception, match="no such file"):
        O.OnnxEncoder(tmp_path)


def test_sentence_transformers_onnx_backend(exported):
    """Only where optimum-onnx installs beside transformers 5 (today it does not: README "ONNX serving")."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx pins transformers < 4.58 (README)")
    import sentence_transformers as st
    out, model = exported
    s = st.SentenceTransformer(str(out), backend="onnx", device="cpu")
    got = torch.as_tensor(s.encode(TEXTS, batch_size=3))
    assert (got - model.encode(TEXTS)).abs().max().item() <= TOL
