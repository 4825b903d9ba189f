"""stella and NV-Embed-v2 teachers on tiny random checkpoints written in the real layouts.

stella_en_1.5B_v5: bare Qwen2Model keys (no prefix) + `2_Dense_{D}/` (sentence-transformers Dense: `linear.weight`,
`linear.bias`). NV-Embed-v2: `embedding_model.*` (Mistral body) + `latent_attention_model.*` in a sharded
model.safetensors.index.json, config.json with model_type "nvembed", text_config and latent_attention_config.
References: transformers' Qwen2Model / MistralModel with a non-causal 4D mask, and a straightforward latent-attention
pooling written below.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import teachers as T
from tokenizer import pad_ids

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from common import bidirectional_mask

RTOL = 1e-5
WORDS = ("the a cat dog sat on mat quick brown fox jumps over lazy river bank money flows Instruct Given query "
         "retrieve passages that answer Query : . , ? is are what how why where").split()


def word_tokenizer(specials, bos=None):
    vocab = {w: i for i, w in enumerate(list(specials) + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return tok, vocab




def perturb(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


TEXTS = ["the quick brown fox jumps over the lazy dog .", "a cat sat", "money flows", "how is the river bank ?",
         "what are passages that answer the query"]


# ------------------------------------------------------------------------------------------------------------------
# stella
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stella_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stella")
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.Qwen2Model(cfg).eval()
    perturb(ref, 1)
    ref.save_pretrained(d, safe_serialization=True)  # bare Qwen2Model keys: embed_tokens, layers.N.*, norm
    tok, _ = word_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(d / "tokenizer.json"))
    heads = {}
    for D in (32, 48):
        hd = d / f"2_Dense_{D}"
        hd.mkdir()
        lin = torch.nn.Linear(64, D)
        save_file({"linear.weight": lin.weight.detach().clone(), "linear.bias": lin.bias.detach().clone()},
                  str(hd / "model.safetensors"))
        (hd / "config.json").write_text(json.dumps({"in_features": 64, "out_features": D, "bias": True,
                                                    "activation_function": "torch.nn.modules.linear.Identity"}))
        heads[D] = lin
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    return d, ref, heads, tok


def test_stella_matches_transformers_qwen2_bidirectional(stella_dir):
    d, ref, heads, tok = stella_dir
    t = T.load_teacher(str(d), dim=48)
    assert isinstance(t, T.StellaTeacher) and t.dim == 48 and t.spec["head"] == "2_Dense_48"
    assert T.detect_family(d) == "stella"
    # body vs transformers Qwen2Model with a non-causal mask, on a padded batch
    ids = [tok.encode(x).ids for x in TEXTS]
    input_ids, mask = pad_ids(ids, 0)
    body = t.module["body"]
    assert body.config.causal is False and body.config.attention_bias is True
    with torch.no_grad():
        h_ref = ref(input_ids=input_ids, attention_mask=bidirectional_mask(mask)).last_hidden_state
    h = body(input_ids=input_ids, attention_mask=mask)
    m = mask.bool()
    assert rel(h[m], h_ref[m]) <= RTOL
    # full encode: masked mean -> 2_Dense_48 -> normalise
    pooled = (h_ref * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expect = F.normalize(heads[48](pooled), dim=-1).detach()
    got = t.encode(TEXTS, batch_size=2)
    assert rel(got, expect) <= RTOL
    # causal attention would give something else (the test can tell the masks apart)
    with torch.no_grad():
        h_causal = ref(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert rel(h[m], h_causal[m]) > 1e-2


def test_stella_query_prompt_and_dims(stella_dir):
    d, ref, heads, tok = stella_dir
    t = T.load_teacher(f"{d}@dim=32")
    assert t.dim == 32
    q = t.encode(["money flows"], instruction="retrieve passages")
    ids = torch.tensor([tok.encode("Instruct: retrieve passages\nQuery: money flows").ids])
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=bidirectional_mask(torch.ones_like(ids))).last_hidden_state
    assert rel(q, F.normalize(heads[32](h.mean(1)), dim=-1).detach()) <= RTOL
    with pytest.raises(T.TeacherError, match="2_Dense_8192"):
        T.load_teacher(str(d))  # the paper's default D = 8192 is not in this tiny checkpoint


# ------------------------------------------------------------------------------------------------------------------
# NV-Embed-v2
# ------------------------------------------------------------------------------------------------------------------
H, LAT, HEADS, DH = 64, 16, 4, 64  # real: 4096, 512, 8, 4096


@pytest.fixture(scope="module")
def nvembed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("nvembed")
    mcfg = transformers.MistralConfig(vocab_size=97, hidden_size=H, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    body = transformers.MistralModel(mcfg).eval()
    perturb(body, 2)
    g = torch.Generator().manual_seed(3)
    lat = {  # latent_attention_model.* in the real key names / layout (shapes scaled down)
        "latents": torch.randn(LAT, H, generator=g),
        "cross_attend_blocks.0.norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
        "cross_attend_blocks.0.norm.bias": 0.1 * torch.randn(H, generator=g),
        "cross_attend_blocks.0.norm_context.weight": 1 + 0.1 * torch.randn(H, generator=g),
        "cross_attend_blocks.0.norm_context.bias": 0.1 * torch.randn(H, generator=g),
        "cross_attend_blocks.0.fn.to_q.weight": torch.randn(HEADS * DH, H, generator=g) / math.sqrt(H),
        "cross_attend_blocks.0.fn.to_kv.weight": torch.randn(2 * HEADS * DH, H, generator=g) / math.sqrt(H),
        "cross_attend_blocks.0.fn.to_out.weight": torch.randn(H, HEADS * DH, generator=g) / math.sqrt(HEADS * DH),
        "cross_attend_blocks.1.norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
        "cross_attend_blocks.1.norm.bias": 0.1 * torch.randn(H, generator=g),
        "cross_attend_blocks.1.fn.net.0.weight": torch.randn(8 * H, H, generator=g) / math.sqrt(H),
        "cross_attend_blocks.1.fn.net.0.bias": 0.1 * torch.randn(8 * H, generator=g),
        "cross_attend_blocks.1.fn.net.2.weight": torch.randn(H, 4 * H, generator=g) / math.sqrt(4 * H),
        "cross_attend_blocks.1.fn.net.2.bias": 0.1 * torch.randn(H, generator=g),
    }
    shard1 = {f"embedding_model.{k}": v.detach().clone().contiguous() for k, v in body.state_dict().items()}
    shard2 = {f"latent_attention_model.{k}": v.contiguous() for k, v in lat.items()}
    save_file(shard1, str(d / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in shard1} | {k: "model-00002-of-00002.safetensors" for k in shard2}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    text_config = mcfg.to_dict() | {"model_type": "bidir_mistral"}
    (d / "config.json").write_text(json.dumps({
        "architectures": ["NVEmbedModel"], "model_type": "nvembed", "padding_side": "right", "add_pad_token": True,
        "is_mask_instruction": True, "add_eos": True, "mask_type": "b",
        "latent_attention_config": {"model_type": "latent_attention", "num_latents_value": LAT,
                                    "num_cross_heads": HEADS, "output_normalize": True, "hidden_dim": H,
                                    "latent_dim": H, "cross_dim_head": DH},
        "text_config": text_config}, default=str))
    tok, vocab = word_tokenizer(["<unk>", "<s>", "</s>"], bos="<s>")
    tok.save(str(d / "tokenizer.json"))
    return d, body, lat, tok


def reference_latent_pool(h, pool_mask, lat):
    """Straightforward latent-attention pooling, one text and one head at a time (NV-Embed paper sec. 3.2)."""
    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), lat[p + ".weight"], lat[p + ".bias"], eps=1e-5)

    out = []
    for b in range(h.shape[0]):
        x = h[b]  # (T, H)
        q = ln(x, "cross_attend_blocks.0.norm") @ lat["cross_attend_blocks.0.fn.to_q.weight"].T  # (T, heads*dh)
        c = ln(lat["latents"], "cross_attend_blocks.0.norm_context")
        kv = c @ lat["cross_attend_blocks.0.fn.to_kv.weight"].T  # (L, 2*heads*dh)
        k, v = kv[:, :HEADS * DH], kv[:, HEADS * DH:]
        heads = []
        for i in range(HEADS):
            s = slice(i * DH, (i + 1) * DH)
            att = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(DH), dim=-1)  # (T, L)
            heads.append(att @ v[:, s])
        x = torch.cat(heads, -1) @ lat["cross_attend_blocks.0.fn.to_out.weight"].T + x
        y = ln(x, "cross_attend_blocks.1.norm") @ lat["cross_attend_blocks.1.fn.net.0.weight"].T + \
            lat["cross_attend_blocks.1.fn.net.0.bias"]
        a, gate = y[:, :4 * H], y[:, 4 * H:]
        x = (a * F.gelu(gate)) @ lat["cross_attend_blocks.1.fn.net.2.weight"].T + lat["cross_attend_blocks.1.fn.net.2.bias"] + x
        keep = pool_mask[b].bool()
        out.append(x[keep].mean(0))
    return torch.stack(out)


def test_nvembed_body_matches_transformers_mistral_bidirectional(nvembed_dir):
    d, body, lat, tok = nvembed_dir
    t = T.load_teacher(str(d))
    assert isinstance(t, T.NVEmbedTeacher) and t.dim == H and T.detect_family(d) == "nvembed"
    ours = t.module["embedding_model"]
    assert ours.config.attention_bias is False and ours.config.causal is False
    ids, mask = pad_ids([tok.encode(x).ids for x in TEXTS], 2)
    with torch.no_grad():
        ref = body(input_ids=ids, attention_mask=bidirectional_mask(mask)).last_hidden_state
    h = ours(input_ids=ids, attention_mask=mask)
    m = mask.bool()
    assert rel(h[m], ref[m]) <= RTOL


def test_nvembed_latent_pooling_matches_reference(nvembed_dir):
    d, body, lat, tok = nvembed_dir
    t = T.load_teacher(str(d))
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 7, H, generator=g)
    pm = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    got = t.module["latent_attention_model"](h, pm)
    assert rel(got, reference_latent_pool(h, pm, lat)) <= RTOL


def test_nvembed_encode_end_to_end(nvembed_dir):
    d, body, lat, tok = nvembed_dir
    t = T.load_teacher(str(d))
    inst = "Given a query retrieve passages"
    for instruction in (None, inst):
        got = t.encode(TEXTS, batch_size=2, instruction=instruction)
        prefix = f"Instruct: {instruction}\nQuery: " if instruction else ""
        ids = [tok.encode(prefix + x + "</s>").ids for x in TEXTS]
        assert all(x[0] == 1 and x[-1] == 2 for x in ids)  # BOS from the tokenizer, EOS appended
        input_ids, mask = pad_ids(ids, 2)
        pool_mask = mask.clone()
        n_instr = len(tok.encode(prefix, add_special_tokens=False).ids) if instruction else 0
        if instruction:
            assert n_instr == 9  # Instruct : Given a query retrieve passages Query :
        pool_mask[:, :n_instr] = 0  # authors: mask[:, :len(tokenize(instruction))] = 0
        with torch.no_grad():
            h = body(input_ids=input_ids, attention_mask=bidirectional_mask(mask)).last_hidden_state
        expect = F.normalize(reference_latent_pool(h, pool_mask, lat), dim=-1)
        assert rel(got, expect) <= RTOL
    # the instruction tokens are really excluded from the pooling (but still attended to)
    no_mask = F.normalize(reference_latent_pool(h, mask, lat), dim=-1)
    assert rel(got, no_mask) > 1e-3


def test_nvembed_strict_loading(nvembed_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    d, *_ = nvembed_dir
    e = tmp_path / "nv"
    shutil.copytree(d, e)
    sd = load_file(str(e / "model-00002-of-00002.safetensors"))
    sd["latent_attention_model.latents"] = sd["latent_attention_model.latents"][:8].contiguous()
    save_file(sd, str(e / "model-00002-of-00002.safetensors"))
    with pytest.raises(Exception, match=r"latent_attention_model.latents.*\(8, 64\)"):
        T.load_teacher(str(e))


def test_multi_teacher_order_and_normalisation(nvembed_dir, stella_dir):
    nv = T.load_teacher(str(nvembed_dir[0]))
    st = T.load_teacher(str(stella_dir[0]), dim=32)
    mt = T.MultiTeacher([nv, st])  # paper order: NV-Embed-v2 then stella
    v = mt.encode(TEXTS)
    assert v.shape == (5, H + 32) and mt.spec["order"] == [nv.name, st.name]
    expect = F.normalize(torch.cat([nv.encode(TEXTS), st.encode(TEXTS)], -1), dim=-1)
    assert torch.allclose(v, expect, atol=1e-6)
    assert torch.allclose(v[:, :H] * math.sqrt(2), nv.encode(TEXTS), atol=1e-6)
