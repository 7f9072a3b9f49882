"""Export our tokenizers as Hugging Face tokenizer files that give the same ids.

    from hf_tokenizer import save_hf_tokenizer
    ids = save_hf_tokenizer(build_tokenizer(...), "hf_model/")  # fields for config.json

``transformers.AutoTokenizer.from_pretrained("hf_model/")`` then loads a fast tokenizer whose
``hf(text).input_ids`` are our ``tokenize(text)`` and whose ``hf.decode(ids)`` is our
``detokenize(ids)`` for ordinary text; no network, no remote code, no sentencepiece needed.

- GPT2BPETokenizer: the same byte-level BPE (vocab, merges, GPT-2's split regex, no prefix
  space). <|endoftext|> is the eos token but, as in ours, text that spells it is plain text.
- GPTSentencePieceTokenizer: a ``tokenizers`` pipeline rebuilt from the SentencePiece model
  proto: the normalizer spec (precompiled charsmap, whitespace rules, dummy prefix) as
  normalizers, BPE merges ranked by piece score or the Unigram scores, byte fallback, and a
  decoder that undoes it. Its control pieces (<s>, </s>) are plain text inside text, as in ours.
- SentencePieceTokenizer (Megatron's): the same pipeline plus its special tokens (<CLS>, <SEP>,
  <EOD>, <MASK>, pad/bos/eos) as added tokens with our ids, matched in the raw text so each
  chunk between them gets its own dummy prefix (ours encodes every chunk separately).
- HuggingFaceTokenizer: saved as it is.
- NullTokenizer: nothing to write.

Every export is loaded back with AutoTokenizer and checked against ours on probe strings
(check_hf_tokenizer).
"""

import os
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, Optional, Tuple

SPACE = "\u2581"  # SentencePiece's escaped space, "▁"
# Strings every export must encode as ours does (checked after writing it)
PROBES = ["Return the sum of two numbers.", "  Leading,  double  and trailing spaces  ",
          "tabs\tand\nnew lines\n\n", "héllo wörld 日本語 🎉", "x", "a<EOD>b </s> <|endoftext|>"]


def save_hf_tokenizer(tokenizer, save_dir: str) -> dict:
    """Write ``tokenizer`` (one of ours) to the existing directory ``save_dir`` as Hugging Face
    tokenizer files (tokenizer.json, tokenizer_config.json) and return the token ids for the
    model's config.json: vocab_size, bos/eos/pad_token_id (None where absent; eos is our eod)
    and "files" (False for NullTokenizer, which writes nothing). Raises ValueError for a
    tokenizer that cannot be exported with the same ids."""
    from megatron.core.tokenizers import TOKENIZER_TYPES, NullTokenizer
    kind = type(tokenizer).__name__
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"cannot export a {kind} as a Hugging Face tokenizer; expected one of "
                         f"{', '.join(TOKENIZER_TYPES)}.")
    if isinstance(tokenizer, NullTokenizer):
        return _config(tokenizer.vocab_size, None, tokenizer.eod, None, files=False)
    if not os.path.isdir(save_dir):
        raise ValueError(f"save_dir={save_dir} is not a directory; create it first.")
    if not 0 <= tokenizer.eod < tokenizer.vocab_size:
        raise ValueError(f"the {kind} has no end-of-document token (eod={tokenizer.eod}) to be "
                         "the Hugging Face eos token.")
    try:
        import tokenizers  # noqa: F401
        import transformers
    except ImportError:
        raise ImportError("save_hf_tokenizer needs transformers and tokenizers: "
                          "pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()
    hf, bos, pad = _build(tokenizer, kind)
    hf.save_pretrained(save_dir)
    check_hf_tokenizer(tokenizer, save_dir)
    return _config(tokenizer.vocab_size, bos, tokenizer.eod, pad, files=True)


def _config(vocab_size, bos, eos, pad, files):
    return {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": pad, "files": files}


def _build(tokenizer, kind):
    """(transformers tokenizer, bos id, pad id) for one of ours."""
    if kind == "HuggingFaceTokenizer":
        hf = tokenizer.tokenizer
        if not hf.is_fast:
            raise ValueError(f"the wrapped {type(hf).__name__} is not a fast tokenizer, so it "
                             "has no tokenizer.json to export; load it as a fast tokenizer.")
        return hf, hf.bos_token_id, hf.pad_token_id
    if kind == "GPT2BPETokenizer":
        from megatron.core.tokenizers.gpt2_bpe import EOD_TOKEN
        return _wrap(_gpt2_backend(tokenizer), eos_token=EOD_TOKEN), None, None
    return _sentencepiece(tokenizer, megatron_specials=kind == "SentencePieceTokenizer")


def _wrap(backend, split_special_tokens=True, **special_tokens):
    """A transformers fast tokenizer around ``backend``. With ``split_special_tokens`` its
    special tokens are not recognized inside text (ours recognizes none); no BOS/EOS is added
    (the post-processor transformers writes is ``$A`` alone), and decoding keeps spaces as
    they are (no clean-up)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False,
        split_special_tokens=split_special_tokens,
        **{name: token for name, token in special_tokens.items() if token is not None})


def _gpt2_backend(tokenizer):
    """GPT-2's byte-level BPE from our tokenizer's vocab and merges (read from whichever
    implementation it runs: the merges are not kept elsewhere)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    if tokenizer._python is not None:
        ranks = tokenizer._python.ranks
        merges = sorted(ranks, key=ranks.get)
    else:
        import json
        merges = json.loads(tokenizer._rust.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    backend = Tokenizer(models.BPE(vocab=dict(tokenizer.vocab), merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


# --- SentencePiece ----------------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
NFKC_RULES = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")  # SentencePiece's built-in rules


@dataclass
class SentencePieceSpec:
    """The fields of a SentencePiece ModelProto that decide its ids (sentencepiece_model.proto),
    with the proto's defaults."""
    pieces: List[Tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""


def _varint(data: bytes, i: int):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, value) of a protobuf message: int for varints, bytes otherwise."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in the SentencePiece model.")
        yield number, value


def read_sentencepiece_spec(serialized: bytes) -> SentencePieceSpec:
    """Parse ``SentencePieceProcessor.serialized_model_proto()`` (no protobuf package needed)."""
    spec = SentencePieceSpec()
    for number, value in _fields(serialized):
        if number == 1:  # pieces
            piece = dict(_fields(value))
            score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
            spec.pieces.append((piece.get(1, b"").decode("utf-8"), score, piece.get(3, NORMAL)))
        elif number == 2:  # trainer_spec
            trainer = dict(_fields(value))
            spec.model_type = trainer.get(3, UNIGRAM)
            spec.byte_fallback = bool(trainer.get(35, False))
            spec.treat_whitespace_as_suffix = bool(trainer.get(24, False))
            spec.unk_surface = trainer[44].decode("utf-8") if 44 in trainer else spec.unk_surface
        elif number == 3:  # normalizer_spec
            normalizer = dict(_fields(value))
            spec.normalizer_name = normalizer.get(1, b"").decode("utf-8")
            spec.precompiled_charsmap = normalizer.get(2, b"")
            spec.add_dummy_prefix = bool(normalizer.get(3, True))
            spec.remove_extra_whitespaces = bool(normalizer.get(4, True))
            spec.escape_whitespaces = bool(normalizer.get(5, True))
        elif number == 5:  # denormalizer_spec
            spec.denormalizer_charsmap = dict(_fields(value)).get(2, b"")
    return spec


def _sentencepiece(tokenizer, megatron_specials: bool):
    sp = tokenizer.sp
    spec = read_sentencepiece_spec(sp.serialized_model_proto())
    _check_exportable(spec, sp.get_piece_size())
    backend = _sentencepiece_backend(spec)
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    if not megatron_specials:
        hf = _wrap(backend, bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
                   pad_token=piece(sp.pad_id()), unk_token=piece(sp.unk_id()))
        return hf, _id_or_none(sp.bos_id()), _id_or_none(sp.pad_id())
    from tokenizers import AddedToken
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    # Added in id order, so the new ones get ours (the model's size, size + 1, ...)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, _ in specials])
    for token, token_id in specials:
        if backend.token_to_id(token) != token_id:
            raise ValueError(f"special token {token} would get id {backend.token_to_id(token)} "
                             f"instead of {token_id}; its ids are not contiguous after the model.")
    bos_piece = piece(sp.bos_id()) or "<BOS>"
    pad_piece = next(t for t, i in specials if i == tokenizer.pad)
    # No unk_token: transformers would make <unk> a special token matched in text, ours is not
    hf = _wrap(backend, split_special_tokens=False, bos_token=bos_piece, pad_token=pad_piece,
               eos_token="<EOD>", cls_token="<CLS>", sep_token="<SEP>", mask_token="<MASK>")
    return hf, tokenizer.special_tokens[bos_piece], tokenizer.pad


def _id_or_none(token_id: int) -> Optional[int]:
    return token_id if token_id >= 0 else None


def _check_exportable(spec: SentencePieceSpec, size: int) -> None:
    problem = None
    if spec.model_type not in (UNIGRAM, BPE):
        problem = f"model_type {spec.model_type} (only BPE and Unigram models can be exported)"
    elif spec.treat_whitespace_as_suffix:
        problem = "treat_whitespace_as_suffix=true"
    elif not spec.escape_whitespaces:
        problem = "escape_whitespaces=false"
    elif spec.denormalizer_charsmap:
        problem = "a denormalizer"
    elif len(spec.pieces) != size:
        problem = f"{len(spec.pieces)} pieces in its proto but {size} in the processor"
    if problem:
        raise ValueError(f"cannot export this SentencePiece model as a Hugging Face tokenizer "
                         f"with the same ids: it has {problem}.")


def _sentencepiece_backend(spec: SentencePieceSpec):
    """A ``tokenizers.Tokenizer`` that segments like SentencePieceProcessor.encode."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    pieces = [p for p, _, _ in spec.pieces]
    unk_id = next((i for i, (_, _, t) in enumerate(spec.pieces) if t == UNKNOWN), None)
    user_defined = [p for p, _, t in spec.pieces if t == USER_DEFINED]
    if spec.model_type == BPE:
        model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=_bpe_merges(spec),
                           unk_token=pieces[unk_id] if unk_id is not None else None,
                           fuse_unk=True, byte_fallback=spec.byte_fallback, dropout=None,
                           ignore_merges=bool(user_defined))
    else:
        model = models.Unigram(_unigram_vocab(spec), unk_id, spec.byte_fallback)
    backend = Tokenizer(model)

    backend.normalizer = normalizers.Sequence(_spm_normalizers(spec))
    if user_defined:
        # SentencePiece emits user-defined pieces whole: isolate them (BPE then takes a word
        # that is a piece as it is: ignore_merges)
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    steps = [decoders.Replace(SPACE, " ")]
    if spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    if unk_id is not None:
        steps.append(decoders.Replace(pieces[unk_id], spec.unk_surface))
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # the dummy prefix; Fuse first: Strip is per token
    backend.decoder = decoders.Sequence(steps)
    return backend


def _spm_normalizers(spec: SentencePieceSpec) -> list:
    """SentencePiece's normalizer (normalizer.cc) as a list of ``tokenizers`` normalizers."""
    from tokenizers import Regex, normalizers
    steps = _charsmap_normalizers(spec)
    if spec.remove_extra_whitespaces:
        # Only the space character counts, after the charsmap: runs collapse, and a leading one
        # goes; trailing ones go after escaping, with any literal "▁" there (as SentencePiece)
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A "), "")]
    steps.append(normalizers.Replace(" ", SPACE))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(SPACE + r"+\z"), ""))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))  # skipped for empty text, as SentencePiece
    return steps


def _charsmap_normalizers(spec: SentencePieceSpec) -> list:
    """The model's precompiled charsmap, made to map as SentencePiece does.

    ``Precompiled`` maps a whole grapheme by the charsmap entry of its shortest prefix and drops
    the rest ("ｒ̂" -> "r", "ﾊﾟ" -> "パ"), where SentencePiece maps the longest match and goes
    on. For the built-in NFKC rules no such grapheme is left for it: NFKC (which those
    charsmaps contain) composes the text first, after the characters the charsmap removes or
    turns into a space ("▁", CR LF, ...) have been; characters whose entry is not their NFKC
    form (nmt_nfkc keeps "～") cross NFKC as noncharacters."""
    from tokenizers import Regex, normalizers
    if not spec.precompiled_charsmap:
        return []
    charsmap = normalizers.Precompiled(spec.precompiled_charsmap)
    if spec.normalizer_name not in NFKC_RULES:
        return [charsmap]
    plan = _nfkc_plan(spec.precompiled_charsmap)
    if plan is None:
        return [charsmap]
    first, protect = plan
    steps = [normalizers.Replace(Regex("[" + "".join(f"\\x{{{ord(c):X}}}" for c in chars) + "]"),
                                 target) for target, chars in first.items()]
    steps += [normalizers.Replace(c, p) for c, p, _ in protect]
    steps += [normalizers.NFKC(), charsmap]
    return steps + [normalizers.Replace(p, target) for _, p, target in protect]


@lru_cache(maxsize=4)
def _nfkc_plan(precompiled_charsmap: bytes):
    """For an NFKC charsmap: ({" " or "": chars the charsmap maps to it and NFKC keeps},
    [(char, placeholder, its charsmap entry) where NFKC then the charsmap differ from the
    charsmap]); None if that cannot be worked out. Every character is mapped alone: NUL, which
    the charsmap keeps, is a grapheme of its own and composes with nothing."""
    from tokenizers import normalizers
    charsmap, nfkc = normalizers.Precompiled(precompiled_charsmap), normalizers.NFKC()
    if charsmap.normalize_str("\0") != "\0":
        return None
    # Planes 0-3 and 14: the rest are private use or unassigned
    chars = [chr(c) for c in (*range(1, 0xD800), *range(0xE000, 0x40000), *range(0xE0000, 0xE1000))]
    mapped = charsmap.normalize_str("\0".join(chars)).split("\0")
    composed = nfkc.normalize_str("\0".join(chars)).split("\0")
    changed = [i for i, (c, n) in enumerate(zip(chars, composed)) if n != c]
    both = charsmap.normalize_str("\0".join(composed[i] for i in changed)).split("\0")
    if len(mapped) != len(chars) or len(composed) != len(chars) or len(both) != len(changed):
        return None
    first = {}
    for c, m, n in zip(chars, mapped, composed):
        if n == c and m != c and m in ("", " "):
            first.setdefault(m, []).append(c)
    placeholders = [chr(c) for c in range(0xFDD0, 0xFDF0)]  # noncharacters: never in text
    protect = [(chars[i], mapped[i]) for i, b in zip(changed, both) if b != mapped[i]]
    if len(protect) > len(placeholders) or any(charsmap.normalize_str(p) != p or
                                               nfkc.normalize_str(p) != p for p in placeholders):
        return None
    return first, [(c, p, m) for (c, m), p in zip(protect, placeholders)]


def _bpe_merges(spec: SentencePieceSpec) -> List[Tuple[str, str]]:
    """SentencePiece's BPE merges any two adjacent symbols whose concatenation is a piece,
    highest score first: every split of a normal piece into two normal pieces is a merge, ranked
    by the score of the piece it makes."""
    normal = {p: (score, i) for i, (p, score, t) in enumerate(spec.pieces) if t == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _unigram_vocab(spec: SentencePieceSpec) -> List[Tuple[str, float]]:
    """Piece scores for the Viterbi search. SentencePiece never matches control, unknown,
    unused or byte pieces in text; Hugging Face's Unigram matches every piece, so those get a
    score below any segmentation of their span into normal pieces."""
    normal = [score for _, score, t in spec.pieces if t == NORMAL]
    hidden = [p for p, _, t in spec.pieces if t not in (NORMAL, USER_DEFINED)]
    floor = min(normal, default=0.0) * (1 + max(map(len, hidden), default=0)) - 10.0
    return [(p, score if t in (NORMAL, USER_DEFINED) else floor) for p, score, t in spec.pieces]


# --- checking an export -------------------------------------------------------------------------

def check_hf_tokenizer(tokenizer, save_dir: str) -> None:
    """Load ``save_dir`` with AutoTokenizer, as a user would, and raise ValueError unless it has
    our vocabulary size and eos and gives our ids for the probe strings. save_hf_tokenizer calls
    it; call it again after writing a model's config.json next to the tokenizer (a model type
    that names its own tokenizer class, such as qwen2, makes AutoTokenizer use that class)."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(save_dir, local_files_only=True)
    found = {"len": len(hf), "eos_token_id": hf.eos_token_id}
    expected = {"len": tokenizer.vocab_size, "eos_token_id": tokenizer.eod}
    if found != expected:
        raise ValueError(f"the tokenizer in {save_dir} has {found}, expected {expected}.")
    for text in PROBES:
        found, expected = hf(text).input_ids, tokenizer.tokenize(text)
        if found != expected:
            raise ValueError(f"the tokenizer in {save_dir} encodes {text!r} as {found}, "
                             f"ours as {expected}.")
