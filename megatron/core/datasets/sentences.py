"""A rule-based sentence splitter that needs no model download (--split-sentences)."""

import re
from typing import List

# A sentence ends at . ! or ? (possibly followed by closing quotes or brackets) before
# whitespace and an upper-case letter, digit, quote or bracket -- unless the word before the
# period is a common abbreviation or a single initial.
_END = re.compile(r"""(?<=[.!?])["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "fig",
    "no", "vol", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec", "approx", "dept", "est", "u.s", "u.k",
}


def split_sentences(text: str, keep_newlines: bool = False) -> List[str]:
    """Sentences of ``text``. Without ``keep_newlines`` newlines count as spaces and the
    whitespace between sentences is dropped; with it, each sentence keeps the whitespace
    (and newlines) that follow it, so the sentences concatenate back to the text."""
    if not keep_newlines:
        text = " ".join(text.split())
    sentences, start = [], 0
    for match in _END.finditer(text):
        before = text[start:match.start()].rstrip("\"')]").rsplit(None, 1)
        word = before[-1].rstrip(".!?").lower() if before else ""
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        sentence = text[start:match.end()]
        sentences.append(sentence if keep_newlines else sentence.rstrip())
        start = match.end()
    if start < len(text):
        sentences.append(text[start:])
    return [s for s in sentences if s.strip()]
