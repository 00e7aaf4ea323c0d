"""Chat templates and the assistant-token mask SFT trains on.

    template = ChatTemplate.load(None)             # the embedded tokenizer's (DEFAULT_CHAT_TEMPLATE)
    template = ChatTemplate.for_tokenizer(None, tokenizer)  # a file, else the tokenizer's own, else default
    text = template.render(messages, add_generation_prompt=True)   # what a prompt looks like
    ids, learn = encode_chat(tokenizer, template, messages)        # learn[i] = 1 on assistant tokens

A template is Jinja, rendered the way Hugging Face's `apply_chat_template` renders one: a sandboxed
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, the variables
`messages` (a list of {"role", "content"}), `add_generation_prompt` and the tokenizer's special
tokens as text (`bos_token`, `eos_token`, ...), the `tojson` filter, and `raise_exception(msg)` for
templates that refuse input. Jinja is what the Hugging Face ecosystem writes templates in, so a
user's template file works here as it does there. (Hugging Face's own renderer needs a
`transformers` tokenizer object; the embedded tokenizer is sentencepiece, hence this small renderer.)

Which template: `sft.chat_template` / `rl.data.chat_template` (a Jinja file) when given, else the
tokenizer's own (a Hugging Face tokenizer directory's `chat_template`), else the default below. The
embedded tokenizer's template is ChatML: `<|im_start|>role\\n content <|im_end|>\\n` per message,
with `<|im_start|>` / `<|im_end|>` single ids (megatron_step.data.tokenizer.USER_SYMBOLS).

The mask: the tokens of each assistant turn -- its content and the end-of-turn text the template
writes after it, which is what the model must learn to emit to stop -- are trained on; the system,
user and tool turns and the assistant header are context. The spans come from rendering prefixes of
the conversation: turn i spans from the end of `render(messages[:i], add_generation_prompt=True)` to
the end of `render(messages[:i + 1])`. That needs a template whose rendering of a prefix is a prefix
of the whole (every common chat template is); one that is not is refused with the turn it broke at.
The text is tokenized piece by piece at the span boundaries, so no token straddles a boundary. The
ids start with the tokenizer's bos unless the template wrote it (`tokenizer.with_bos`).
"""

from __future__ import annotations

import json
import os

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ROLES", "ChatError", "ChatTemplate", "encode_chat"]

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A conversation or a template that cannot be trained on (the message says which and why)."""


def _raise(message: str):
    raise ChatError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # as Hugging Face's renderer defines the filter (Jinja's own escapes HTML characters)
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTemplate:
    """A compiled Jinja chat template. `source`: where it came from (for messages); `variables`: what
    it is rendered with besides the messages (the tokenizer's special tokens)."""

    def __init__(self, text: str, source: str = "the default chat template", variables: dict | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        self.variables = dict(variables or {})
        try:
            self.template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f"{source}: line {e.lineno}: {e.message}") from None
        self.text, self.source = text, source

    @classmethod
    def load(cls, path: str | None, variables: dict | None = None) -> ChatTemplate:
        """The template in the file `path` (Jinja text), or the default one for None."""
        if path is None:
            return cls(DEFAULT_CHAT_TEMPLATE, variables=variables)
        if not os.path.isfile(path):
            raise ChatError(f"chat template {path!r}: no such file (a Jinja file; omit it for the default)")
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), source=path, variables=variables)

    @classmethod
    def for_tokenizer(cls, path: str | None, tokenizer) -> ChatTemplate:
        """The file `path` if given, else `tokenizer`'s own template, else the default; rendered with
        the tokenizer's special tokens."""
        own = getattr(tokenizer, "chat_template", None)
        variables = getattr(tokenizer, "special_tokens", {})
        if path is None and own:
            return cls(own, source=f"{tokenizer.model_path} (its chat_template)", variables=variables)
        return cls.load(path, variables)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(
                **self.variables, messages=messages, add_generation_prompt=add_generation_prompt
            )
        except ChatError:
            raise
        except jinja2.TemplateError as e:
            raise ChatError(f"{self.source}: {type(e).__name__}: {e}") from None


def check_messages(messages, need_assistant: bool = True) -> list[dict]:
    """`messages` as the OpenAI chat format has them: a non-empty list of {"role", "content"} with a
    known role and text content, at least one assistant turn (`need_assistant`: a conversation to
    train on; an RL prompt has none). Returns it; raises ChatError naming the message that is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"messages: expected a non-empty list of {{role, content}}, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"messages[{i}]: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatError(f"messages[{i}].role={m['role']!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatError(f"messages[{i}].content: expected text, got {type(m['content']).__name__}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatError("messages: no assistant turn, nothing to train on")
    return messages


def encode_chat(tokenizer, template: ChatTemplate, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, after the tokenizer's bos unless the template wrote it;
    0/1 per id: 1 on assistant turns). See the module docstring for the spans."""
    check_messages(messages)
    text = template.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)) or len(through) == len(before):
            raise ChatError(
                f"{template.source}: rendering messages[:{i}] (+ generation prompt) is not a prefix of "
                f"rendering messages[:{i + 1}] and of the whole conversation, so the assistant turn "
                f"{i} has no span to train on; SFT needs a prefix-stable template"
            )
        spans.append((len(before), len(through)))
    ids, learn, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[pos:a], 0), (text[a:b], 1)):
            if piece:
                got = tokenizer.encode(piece)
                ids += got
                learn += [flag] * len(got)
        pos = b
    full = tokenizer.with_bos(ids)
    return full, [0] * (len(full) - len(ids)) + learn
