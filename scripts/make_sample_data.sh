#!/usr/bin/env bash
# The sample corpus the quickstart and the Peri-LN study train on, built once (no download):
#   bash scripts/make_sample_data.sh      (needs .venv: bash scripts/setup_env.sh)
# 1. data/quickstart/stdlib_docs.jsonl: the docstrings of the Python standard library,
# 2. data/quickstart/tok.model: a 4,000-piece SentencePiece tokenizer trained on it (seconds),
# 3. data/quickstart/stdlib_docs_text_document.{bin,idx}: tools/preprocess_data.py's output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
DATA=data/quickstart
mkdir -p "$DATA"
[ -f "$DATA/stdlib_docs.jsonl" ] || $PY tools/make_sample_corpus.py --output "$DATA/stdlib_docs.jsonl"
[ -f "$DATA/tok.model" ] || $PY tools/train_tokenizer.py --input "$DATA/stdlib_docs.jsonl" \
    --output "$DATA/tok" --type sentencepiece --vocab-size 4000
[ -f "$DATA/stdlib_docs_text_document.idx" ] || $PY tools/preprocess_data.py \
    --input "$DATA/stdlib_docs.jsonl" --output-prefix "$DATA/stdlib_docs" \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tok.model" \
    --append-eod --workers 2
