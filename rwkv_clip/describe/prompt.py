"""Prompt template, answer cleaning and answer rejection for description generation.

The template is plain text with the placeholders {text}, {synthetic_caption}, {tags} and {max_words}.
Only these exact names are substituted (no str.format / eval: a user template cannot run code), other
braces are left alone, and an unknown {identifier} is an error so typos such as {caption} are caught.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Optional

from rwkv_clip.schema import SYNTHETIC_CAPTION, TAGS, TEXT

PROMPT_FIELDS = (TEXT, SYNTHETIC_CAPTION, TAGS)  # what a row gives the prompt (generated_caption is the answer)
FIELDS = (*PROMPT_FIELDS, "max_words")
DEFAULT_SYSTEM_PROMPT = "You write short, faithful image descriptions."
EMPTY_FIELD = "(none)"
MAX_FIELD_CHARS = 2000  # a runaway web alt-text must not blow the model's context

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def default_template_text(name: str = "prompt.txt") -> str:
    return resources.files("rwkv_clip.describe").joinpath(name).read_text(encoding="utf-8")


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", s.lower())


class PromptTemplate:
    """A user-replaceable prompt. `render(text=..., synthetic_caption=..., tags=...)` -> the user message."""

    def __init__(self, template: str, max_words: int = 40, source: str = "<string>", image: bool = False):
        """``image``: the prompt goes with the row's image (captions, tags), so it may name no row field."""
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        names = set(_PLACEHOLDER.findall(template))
        unknown = names - set(FIELDS)
        if unknown:
            raise ValueError(
                f"prompt template {source} has unknown placeholder(s) {sorted('{' + u + '}' for u in unknown)}; "
                f"allowed: {', '.join('{' + f + '}' for f in FIELDS)}")
        if not image and not names & set(PROMPT_FIELDS):
            raise ValueError(f"prompt template {source} uses none of {{text}}, {{synthetic_caption}}, {{tags}}; "
                             "the model would never see the row")
        self.template, self.max_words, self.source = template, max_words, source
        # Static (row-independent) text, used to detect answers that parrot the prompt back.
        pieces = [p for p in _PLACEHOLDER.split(template)[::2]]
        static = [s.replace("{max_words}", str(max_words)) for s in pieces]
        self._labels = [" ".join(_words(s.strip().splitlines()[-1])) for s in static if s.strip()]
        self._labels = [l for l in self._labels if l]
        ws = _words(" ".join(static))
        self._static_ngrams = {tuple(ws[i:i + 5]) for i in range(len(ws) - 4)}

    @classmethod
    def from_file(cls, path: Optional[str] = None, max_words: int = 40, default: str = "prompt.txt",
                  image: bool = False) -> "PromptTemplate":
        """The template in ``path``, or the shipped ``rwkv_clip/describe/<default>`` (``caption_prompt.txt`` and
        ``tags_prompt.txt`` are the image prompts)."""
        if path is None:
            return cls(default_template_text(default), max_words, source=f"<default {default}>", image=image)
        p = Path(path)
        if not p.is_file():
            allowed = "{max_words} and optionally {text}" if image else \
                "{text}, {synthetic_caption}, {tags} (and optionally {max_words})"
            raise ValueError(f"prompt template {path!r} is not a file; pass a text file with {allowed} placeholders")
        return cls(p.read_text(encoding="utf-8"), max_words, source=str(p), image=image)

    def render(self, text: str = "", synthetic_caption: str = "", tags: str = "") -> str:
        """The user message for one row; ``tags`` as :func:`rwkv_clip.schema.format_tags` writes them."""
        values = {TEXT: text, SYNTHETIC_CAPTION: synthetic_caption, TAGS: tags}
        values = {k: (" ".join(str(v).split())[:MAX_FIELD_CHARS] or EMPTY_FIELD) for k, v in values.items()}
        values["max_words"] = str(self.max_words)
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)

    def repeats_prompt(self, answer: str) -> bool:
        """True if the answer echoes the instructions (>= 2 of their 5-grams) or >= 2 field labels."""
        ws = _words(answer)
        shared = sum(1 for i in range(len(ws) - 4) if tuple(ws[i:i + 5]) in self._static_ngrams)
        if shared >= 2:
            return True
        low = " ".join(ws)
        return sum(1 for l in self._labels if len(l.split()) >= 2 and l in low) >= 2


# ----------------------------------------------------------------------------------------------- cleaning
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_PREFIXES = [
    re.compile(r"^(?:sure|certainly|okay|ok|of course)\b[!,.]*\s*", re.I),
    re.compile(r"^here(?:'s|’s| is| are)\b[^:\n]{0,100}:\s*", re.I),
    re.compile(r"^\**\s*(?:(?:the|a|an|final|new|merged|rewritten|image|fluent|one[- ]sentence|improved)\s+)*"
               r"(?:description|caption|answer|output|response|summary|result)\s*\**\s*[:\-–—]\s*\**\s*", re.I),
]
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("`", "`"), ("**", "**"), ("*", "*")]
_WORDCOUNT = re.compile(r"\s*[\(\[]\s*(?:word count\s*:?\s*)?\d+\s*words?\s*[\)\]]\s*$", re.I)


def _strip_quotes(s: str) -> str:
    changed = True
    while changed and s:
        changed = False
        for a, b in _QUOTES:
            if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
                inner = s[len(a):-len(b)]
                if a in ('"', "'") and a in inner:  # '"Dog" on a mat' is not wrapped in quotes
                    continue
                s, changed = inner.strip(), True
    return s


_DANGLING = {"a", "an", "the", "of", "and", "or", "with", "in", "on", "at", "to", "for", "from", "by", "its",
             "their", "his", "her", "is", "are", "while", "as", "that", "which"}


def cap_words(s: str, limit: int) -> str:
    """Cut to at most `limit` words, preferring the last sentence end if it keeps >= half of them."""
    words = s.split()
    if len(words) <= limit:
        return s
    cut = " ".join(words[:limit])
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", cut)]
    if ends and len(cut[:ends[-1]].split()) >= limit // 2:
        return cut[:ends[-1]]
    cut_words = cut.rstrip(",;:-–— ").split()
    while len(cut_words) > 1 and cut_words[-1].lower() in _DANGLING:  # not "... with a."
        cut_words.pop()
    return " ".join(cut_words).rstrip(",;:-–— ") + "."


def clean_answer(answer: Optional[str], cap: int) -> str:
    """Strip reasoning blocks, code fences, chatty prefixes ("Here is ...:", "Description:"), wrapping quotes,
    trailing word counts; keep the first paragraph; collapse whitespace; cap at `cap` words."""
    s = _THINK.sub("", answer or "").strip()
    s = _FENCE.sub("", s).strip()
    for _ in range(4):  # prefixes can stack: 'Sure! Here is the description: "..."'
        before = s
        for p in _PREFIXES:
            s = p.sub("", s, count=1).strip()
        s = _strip_quotes(s)
        if s == before:
            break
    paragraphs = [p for p in re.split(r"\n\s*\n", s) if p.strip()]
    s = paragraphs[0] if paragraphs else ""
    s = _WORDCOUNT.sub("", s)
    s = _strip_quotes(" ".join(s.split()))
    return cap_words(s, cap) if s else ""


_REFUSAL = re.compile(
    r"\b(?:i['’]?m sorry|i am sorry|sorry,|i apologi[sz]e|as an ai\b|as a language model|as an assistant|"
    r"i (?:cannot|can['’]?t|am unable to|['’]?m unable to|am not able to|['’]?m not able to|won['’]?t)\s+"
    r"(?:help|assist|provide|describe|comply|create|generate|write|fulfil|do that|see|view)|"
    r"unable to (?:provide|describe|help|assist|generate))", re.I)


def check_answer(clean: str, template: PromptTemplate, min_words: int = 3) -> Optional[str]:
    """Reason to reject a cleaned answer, or None if it is usable."""
    if not clean:
        return "empty answer"
    if _REFUSAL.search(clean[:200]):
        return "refusal"
    if template.repeats_prompt(clean):
        return "repeats the prompt"
    if len(clean.split()) < min_words:
        return f"too short (< {min_words} words)"
    return None


_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
_ARTICLE = re.compile(r"^(?:a|an|the|some)\s+", re.I)


def parse_tag_answer(answer: Optional[str], top_k: int, max_tag_words: int = 4) -> list[str]:
    """Tags from a model's list answer ("dog, red ball, grass", a bulleted or numbered list, "Tags: ..."):
    lowercased, articles and end punctuation removed, items longer than ``max_tag_words`` words (sentences, not
    tags) dropped, repeats kept once, at most ``top_k``."""
    s = _THINK.sub("", answer or "").strip()
    s = _FENCE.sub("", s).strip()
    for p in _PREFIXES[:2]:
        s = p.sub("", s, count=1).strip()
    s = re.sub(r"^\**\s*(?:tags|objects|labels|list|items)\s*\**\s*:\s*", "", s, flags=re.I)
    tags, seen = [], set()
    for part in re.split(r"[,;\n|]", s):
        tag = _LIST_ITEM.sub("", part)
        tag = _strip_quotes(" ".join(tag.split()).strip(" .!*"))
        tag = _ARTICLE.sub("", tag).lower()
        if not tag or len(tag.split()) > max_tag_words or tag in seen or _REFUSAL.search(tag):
            continue
        seen.add(tag)
        tags.append(tag)
        if len(tags) == top_k:
            break
    return tags
