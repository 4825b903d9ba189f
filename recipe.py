"""The paper's text recipe (arXiv 2412.19048, sec. 3.2) as pure functions over strings and record streams.

The training texts are a mix: 80% fineweb-edu passages and 20% short texts from embedding-training-data; 30% of
the passage documents, chosen at random, are cut into pieces of 1-10 consecutive sentences; 0.08% of all texts get
their words shuffled. This file holds the three operations and the seeded mix that applies them:
  - `split_sentences` / `split_into_pieces`: a rule-based English sentence splitter (abbreviations, initials,
    quotes, decimals) and the cut of a document into pieces of min..max sentences;
  - `shuffle_words`: the word-order perturbation;
  - `mix`: draws each output text's input in proportion to its weight and applies the two operations.
Opening the inputs (files, globs, hub datasets) and writing texts.jsonl is data.py's job (`data.recipe_stream`,
`data.build`); nothing here reads a file, so the recipe can be read, tested and reused on its own.
The authors released no code for this part; the choices are documented in docs/data.md.
"""
from __future__ import annotations

import bisect
import random
import re
from collections import Counter, deque
from dataclasses import dataclass, field as dc_field
from typing import Iterator

import numpy as np


# Abbreviations after which a period does not end a sentence. TITLES never end one before a capitalised word
# ("Mr. Howard"); OTHER ends one only if the next word is a common sentence opener ("... Ltd. The firm" splits,
# "Smith et al. Nature" does not). Single capital letters are initials ("J. R. R. Tolkien"); dotted forms
# ("U.S.", "e.g.", "Ph.D.") join OTHER. Decimals ("3.14") never meet the rule: no whitespace follows their dot.
_TITLES = frozenset("""mr mrs ms messrs mme mlle dr prof rev hon gen col lt sgt capt cmdr adm maj brig cpl pvt sen
    rep gov pres supt insp fr sr jr st mt ft""".split())
_OTHER_ABBR = frozenset("""etc vs v al cf inc ltd co corp bros assn dept univ est approx ca no nos vol vols fig figs
    ch chap sec p pp ed eds op ibid jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thur thurs
    fri sat sun ave blvd rd e.g i.e a.m p.m u.s u.k u.n u.s.a ph.d b.a m.a b.sc m.sc d.c n.y l.a""".split())
_OPENERS = frozenset("""the a an he she it they we i you his her its their our my this that these those there here
    but and so yet or in on at for from with by as after before when while if although though however meanwhile
    then thus also many most some one two no not what who why how where which""".split())
_BOUNDARY = re.compile(r"""([.!?\u2026]+)(["'\u201d\u2019)\]]*)(\s+)""")  # groups: punctuation run, closers, gap
_PARAGRAPH = re.compile(r"\n\s*\n")  # a blank line (possibly with spaces) ends a paragraph
_OPEN = "\"'\u201c\u2018([¿¡"  # may precede a sentence's first letter


def _next_word(text: str, pos: int) -> str:
    m = re.match(r"""["'\u201c\u2018(\[]*([\w'-]+)""", text[pos:pos + 64])  # skip opening quotes / brackets
    return m.group(1) if m else ""


def _ends_sentence(text: str, m: re.Match, limit: int) -> bool:
    """Decide one candidate boundary: punctuation run, optional closing quotes/brackets, whitespace."""
    nxt = m.end()
    if nxt >= limit:
        return True  # the punctuation ends the paragraph
    c = text[nxt]
    if c.islower():
        return False  # '"Why?" he asked', 'e.g. something', 'approx. three'
    if not (c.isupper() or c.isdigit() or c in _OPEN or text.startswith("--", nxt)):
        return False  # , ; etc. after the punctuation: mid-sentence ("--" opens a list item / sentence)
    punct = m.group(1)
    if punct != ".":
        return True  # ! ? ... and runs of them
    # a single period: look at the word before it
    start = m.start()
    j = start
    while j > 0 and not text[j - 1].isspace() and text[j - 1] not in _OPEN:
        j -= 1
    word = text[j:start]
    if not word:  # tokenised text: "actor . He" ends; "( c . 56 - 117 )" does not
        k = j - 1
        while k > 0 and not text[k - 1].isspace():
            k -= 1
        prev = text[k:j - 1].lower() if j > 0 else ""  # the token before the lone '.'
        return not (c.isdigit() and (prev in _OTHER_ABBR or (len(prev) == 1 and prev.isalpha())))
    lw = word.lower()
    if lw in _TITLES:
        return False
    if len(word) == 1 and word.isalpha():
        return not word.isupper()  # an initial: "J. Smith"; a lowercase letter ends a list item / sentence
    # dotted forms: U.S, e.g, Ph.D (`word` excludes the period being judged)
    dotted = re.fullmatch(r"(?:[A-Za-z]{1,2}\.)+[A-Za-z]{1,2}", word) is not None
    if lw in _OTHER_ABBR or dotted:
        if c.isdigit():
            return False  # "No. 5", "pp. 12", "Jan. 3"
        return _next_word(text, nxt).lower() in _OPENERS
    return True  # an ordinary word: the period ends the sentence


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Rule-based sentence boundaries: (start, end) character spans into `text`, whitespace excluded. Paragraph
    breaks (blank lines) always end a sentence; see _ends_sentence for the rule at . ! ? and ellipses."""
    spans = []
    for pm in _iter_paragraphs(text):
        p0, p1 = pm
        start = p0
        for m in _BOUNDARY.finditer(text, p0, p1):
            if _ends_sentence(text, m, p1):
                _add_span(spans, text, start, m.end(2))  # closing quotes / brackets stay with their sentence
                start = m.end()
        _add_span(spans, text, start, p1)  # the paragraph's tail, with or without final punctuation
    return spans


def _add_span(spans: list, text: str, a: int, b: int) -> None:
    """Append a stripped span; a piece with no letter or digit (a stray closing quote in tokenised text: '... read .
    "') joins the previous sentence instead of standing alone."""
    if not text[a:b].strip():
        return
    a, b = _strip_span(text, a, b)
    if spans and not any(ch.isalnum() for ch in text[a:b]):
        spans[-1] = (spans[-1][0], b)
    else:
        spans.append((a, b))


def _iter_paragraphs(text: str) -> Iterator[tuple[int, int]]:
    start = 0
    for m in _PARAGRAPH.finditer(text):
        yield start, m.start()
        start = m.end()
    yield start, len(text)


def _strip_span(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (see sentence_spans)."""
    return [text[a:b] for a, b in sentence_spans(text)]


def split_into_pieces(text: str, rng: random.Random, min_sentences: int = 1, max_sentences: int = 10) -> list[str]:
    """Cut a document into consecutive short texts of k ~ U{min..max} sentences each (sec. 3.2: "split into short
    texts of 1 to 10 sentences"). Pieces keep the original characters between their sentences."""
    spans = sentence_spans(text)
    pieces, i = [], 0
    while i < len(spans):
        k = rng.randint(min_sentences, max_sentences)
        a, b = spans[i][0], spans[min(i + k, len(spans)) - 1][1]  # the last piece may have fewer than k sentences
        pieces.append(text[a:b])  # a slice of the original: spacing and newlines between sentences kept
        i += k
    return pieces or [text]  # no sentence at all (whitespace only): the text stays whole


def shuffle_words(text: str, rng: random.Random) -> str:
    """Word-level shuffle (sec. 3.2, 0.08% of texts): whitespace-separated words in random order, single spaces."""
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


@dataclass
class SourceSpec:
    """One input of the mix: `weight` is its share of the output texts; `split` lets its documents be split."""
    name: str
    spec: str
    weight: float
    kind: str            # the row's "kind" for unsplit texts ("passage" / "short")
    split: bool
    field: str = "text"


@dataclass
class Example:
    text: str
    source: str          # the record's own "source" label if it has one, else the file stem
    kind: str            # passage | split | short, with "+shuffled" appended for word-shuffled texts
    doc: int             # index of the document (within its input) the text came from


@dataclass
class RecipeStats:
    docs: Counter = dc_field(default_factory=Counter)        # documents read, per input name
    docs_split: Counter = dc_field(default_factory=Counter)  # documents chosen for splitting, per input name
    texts: Counter = dc_field(default_factory=Counter)       # texts out, per kind
    slots: Counter = dc_field(default_factory=Counter)       # texts out, per input name
    shuffled: int = 0
    skips: Counter = dc_field(default_factory=Counter)       # bad input, per kind
    exhausted: str | None = None

    def as_dict(self) -> dict:
        return {"docs": dict(self.docs), "docs_split": dict(self.docs_split), "texts": dict(self.texts),
                "texts_per_input": dict(self.slots), "shuffled": self.shuffled, "skips": dict(self.skips),
                "exhausted": self.exhausted}


def mix(sources: list[SourceSpec], readers: list[Iterator], *, seed: int = 0, split_ratio: float = 0.3,
        min_sentences: int = 1, max_sentences: int = 10, shuffle_ratio: float = 0.0008, n_texts: int | None = None,
        stats: RecipeStats | None = None) -> Iterator[Example]:
    """The paper's text mix as a stream (sec. 3.2). Each output text draws its input with probability proportional
    to `weight` (default 0.8 passages / 0.2 short), so the text-level mix matches the weights. A drawn input hands out
    its next text; when it has none queued it reads its next document, and with probability `split_ratio` (inputs
    with split=True) cuts it into pieces of min..max sentences that are handed out in order by its next draws.
    Every text is word-shuffled with probability `shuffle_ratio`. Three independent seeded streams (mix, split,
    shuffle) make it deterministic; it stops at n_texts or when an input runs out (no input is repeated, so the mix
    stays unbiased; stats.exhausted names it)."""
    if len(readers) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(readers)} readers")
    if not sources:
        raise ValueError("recipe needs at least one input")
    for a, b, what in ((split_ratio, 1, "split_ratio"), (shuffle_ratio, 1, "shuffle_ratio")):
        if not 0 <= a <= b:
            raise ValueError(f"{what} must be in [0, 1], got {a}")
    if not 1 <= min_sentences <= max_sentences:
        raise ValueError(f"need 1 <= min_sentences <= max_sentences, got {min_sentences}, {max_sentences}")
    stats = stats if stats is not None else RecipeStats()
    # separate streams: changing shuffle_ratio does not change which documents are split (docs/data.md)
    mix_rng, split_rng, shuf_rng = (random.Random(f"jasper-data/{seed}/{s}") for s in ("mix", "split", "shuffle"))
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"source weights must be >= 0 with a positive sum, got {weights.tolist()}")
    cum = np.cumsum(weights / weights.sum()).tolist()  # bisect maps a U[0, 1) draw to an input
    queues: list[deque] = [deque() for _ in sources]
    n = 0
    while n_texts is None or n < n_texts:
        i = min(bisect.bisect_right(cum, mix_rng.random()), len(sources) - 1)  # cum[-1] may round below 1
        src = sources[i]
        if not queues[i]:  # a split document's pieces go out on this input's next draws
            rec = next(readers[i], None)
            if rec is None:
                stats.exhausted = src.name
                return  # stop rather than repeat an input, which would skew the mix
            doc = stats.docs[src.name]  # 0-based document index within this input
            stats.docs[src.name] += 1
            if src.split and split_rng.random() < split_ratio:
                stats.docs_split[src.name] += 1
                for piece in split_into_pieces(rec.text, split_rng, min_sentences, max_sentences):
                    queues[i].append(Example(piece, rec.source, "split", doc))
            else:
                queues[i].append(Example(rec.text, rec.source, src.kind, doc))
        ex = queues[i].popleft()
        if shuf_rng.random() < shuffle_ratio:
            ex.text, ex.kind = shuffle_words(ex.text, shuf_rng), ex.kind + "+shuffled"
            stats.shuffled += 1
        stats.texts[ex.kind] += 1
        stats.slots[src.name] += 1
        n += 1
        yield ex
