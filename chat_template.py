"""A folder's chat template, rendered as transformers renders it, for sentence-transformers' `message` modality.

sentence-transformers >= 6 saves any model whose tokenizer has a chat template with `message` in the
`modality_config` of sentence_bert_config.json, and then encodes a plain string as a one-message conversation
(`Transformer.preprocess`, checked against 6.3):

  - the text becomes `[{"role": "user", "content": text}]` ("flat" format) or
    `[{"role": "user", "content": [{"type": "text", "text": text}]}]` ("structured"), the format being the
    config's `message.format`, else guessed from the model type and the template's text (InputFormatter);
  - a prompt (prompt_name / prompt) becomes a leading `{"role": "system", ...}` message, not a text prefix, and no
    prompt length is tracked: Pooling's `include_prompt: false` has no effect on such a folder;
  - the template is rendered with `add_generation_prompt=False` (unless processing_kwargs' `chat_template` bucket
    says otherwise), the tokenizer's named special tokens (bos_token, eos_token, ...) as variables, and the result is
    tokenised WITHOUT the tokenizer's own special tokens (the template writes them), truncated to max_length;
  - a row cut by truncation gets the template's tail (e.g. `<|im_end|>\\n`) written back over its last tokens
    (`_restore_chat_template_suffix`): the longest common token suffix of two renders with dummy contents.

The rendering itself is transformers' (`utils/chat_template_utils.py`): jinja2's ImmutableSandboxedEnvironment (chat
templates from the hub are untrusted code) with trim_blocks, lstrip_blocks, the loopcontrols extension, a
`{% generation %}` tag, `raise_exception`, `strftime_now` and a `tojson` filter that does not HTML-escape.
The template comes from chat_template.jinja (which wins, as in transformers) or tokenizer_config.json's
`chat_template`. A template that cannot be compiled or rendered is refused at load time, naming its file.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

import jinja2  # runtime: renders the chat template (jinja2>=3.1.6 in requirements.txt)
import jinja2.nodes
import jinja2.utils
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from checkpoints import read_json

# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES), passed to the template
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# sentence-transformers' InputFormatter: model types whose templates want flat content, else the template's text
# decides (any of these patterns -> structured content)
KNOWN_FLAT_MODEL_TYPES = ("apertus", "deepseek_v3", "gpt_oss", "minicpm3", "seed_oss")
STRUCTURED_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type", "message.content[")
# apply_chat_template's size arguments: in the chat_template bucket they size the tokenisation, not the template
SIZE_KWARGS = ("padding", "truncation", "max_length", "return_tensors")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-token masks in transformers): renders its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore names (as transformers': no route to CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick, so `namespace(self=...)` still works
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())  # a jinja message may span lines; the refusal is one line


def compile_template(source: str) -> jinja2.Template:
    """The environment transformers builds for chat templates (sandboxed, untrusted code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f), dict=dict,
                       namespace=_Namespace)
    return env.from_string(source)


def find_template(folder: Path, error: type[Exception]) -> tuple[str, Path] | None:
    """(template text, its file) as transformers' tokenizer loading picks it: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or a list of named templates of which "default" is used).
    None when the folder has no template."""
    jf = folder / "chat_template.jinja"
    if jf.is_file():
        return jf.read_text(encoding="utf-8"), jf
    tcf = folder / "tokenizer_config.json"
    tpl = read_json(tcf, error=error).get("chat_template") if tcf.is_file() else None
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}]: transformers uses "default" (no tools)
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        if "default" not in named:
            raise error(f"{tcf}: chat_template lists named templates {sorted(map(str, named))} and none is "
                        "'default' (the one sentence-transformers renders)")
        tpl = named["default"]
    if tpl is None:
        return None
    if not isinstance(tpl, str):
        raise error(f"{tcf}: chat_template is a {type(tpl).__name__}, expected the template text")
    return tpl, tcf


def special_tokens(folder: Path, error: type[Exception]) -> dict[str, str]:
    """The named special tokens of tokenizer_config.json (a string or an AddedToken dict), as the template sees
    them (transformers' special_tokens_map: only the tokens that are set)."""
    tcf = folder / "tokenizer_config.json"
    cfg = read_json(tcf, error=error) if tcf.is_file() else {}
    out = {}
    for k in SPECIAL_TOKENS:
        v = cfg.get(k)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[k] = v
    return out


class ChatTemplate:
    """Renders texts (with an optional prompt) through a folder's chat template the way sentence-transformers'
    message modality does; tokenisation and the truncated-row suffix are the caller's (teachers.py)."""

    def __init__(self, source: str, file: Path, fmt: str, variables: dict, error: type[Exception]):
        self.file, self.format, self.variables, self.error = file, fmt, variables, error
        try:
            self.template = compile_template(source)
        except jinja2.TemplateError as e:
            raise error(f"{file}: the chat template cannot be compiled ({type(e).__name__}: {_one_line(e)})") from None
        self.render(["probe"])  # a template that cannot render a plain text is refused now, not mid-run

    @classmethod
    def load(cls, folder: Path, fmt: str, model_type: str | None, kwargs: dict,
             error: type[Exception]) -> "ChatTemplate":
        """The template of `folder` (the Transformer module's), `fmt` the config's message format ("flat",
        "structured" or "auto"), `kwargs` the chat_template processing kwargs (template variables)."""
        found = find_template(folder, error)
        if found is None:
            raise error(f"{folder / 'sentence_bert_config.json'}: modality_config lists 'message' but the folder has "
                        "no chat template (chat_template.jinja or tokenizer_config.json's chat_template)")
        source, file = found
        if fmt == "auto":  # InputFormatter._infer_format
            fmt = ("flat" if model_type in KNOWN_FLAT_MODEL_TYPES else
                   "structured" if any(p in source for p in STRUCTURED_PATTERNS) else "flat")
        if fmt not in ("flat", "structured"):
            raise error(f"{folder / 'sentence_bert_config.json'}: message format {fmt!r} (flat, structured or auto)")
        # special tokens first: template kwargs override them (as apply_chat_template)
        variables = {**special_tokens(folder, error), "add_generation_prompt": False, **kwargs}
        return cls(source, file, fmt, variables, error)

    def _content(self, text: str):
        return text if self.format == "flat" else [{"type": "text", "text": text}]

    def messages(self, text: str, prompt: str | None = None) -> list[dict]:
        """One conversation: a system message holding the prompt (when non-empty), then the text as the user's."""
        system = [{"role": "system", "content": self._content(prompt)}] if prompt else []
        return system + [{"role": "user", "content": self._content(text)}]

    def render(self, texts: Sequence[str], prompt: str | None = None) -> list[str]:
        """Each text (with the prompt as a system message) -> the rendered string."""
        out = []
        for text in texts:
            try:
                out.append(self.template.render(messages=self.messages(text, prompt), tools=None, documents=None,
                                                **self.variables))
            except Exception as e:  # noqa: BLE001 - any failure inside an untrusted template is the folder's
                what = "a plain text" + (f" with the prompt {prompt!r}" if prompt else "")
                raise self.error(f"{self.file}: the chat template cannot be rendered for {what} "
                                 f"({type(e).__name__}: {_one_line(e)})") from None
        return out
