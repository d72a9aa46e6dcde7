"""
Tokenizer benchmark: train a BPE vocabulary on ~10 MB of stories, then time encoding.

    python bench/bench_tokenizer.py                      # stories from corpus.builtin_stories
    python bench/bench_tokenizer.py --text stories.txt   # a text file (documents split on <|endoftext|>),
                                                         # repeated until --mb megabytes

Bars: training a 4096-token vocabulary in <= 20 s, encoding >= 5 MB/s (2 cores).
If the Hugging Face `tokenizers` library is installed, it is timed on the same
text and its ids are compared with ours.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tokenizer import Tokenizer  # noqa: E402


def load_documents(path, mb):
    """Documents of the file at path, repeated until they hold at least mb MB of UTF-8."""
    with open(path, encoding="utf-8") as f:
        docs = [d.strip() for d in f.read().split("<|endoftext|>") if d.strip()]
    if not docs:
        sys.exit(f"{path}: no text")
    size = sum(len(d.encode()) for d in docs)
    return docs * -(-int(mb * 1e6) // size)


def builtin_documents(mb):
    from corpus import builtin_stories
    sample = builtin_stories(200, seed=0)
    per_story = sum(len(s.encode()) for s in sample) / len(sample)
    return builtin_stories(int(mb * 1e6 / per_story) + 1, seed=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", help="text file of documents separated by <|endoftext|>")
    ap.add_argument("--mb", type=float, default=10.0, help="megabytes of text to use")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size to train")
    args = ap.parse_args()

    docs = load_documents(args.text, args.mb) if args.text else builtin_documents(args.mb)
    nbytes = sum(len(d.encode()) for d in docs)
    print(f"text: {len(docs):,} documents, {nbytes / 1e6:.2f} MB, {os.cpu_count()} cores")

    t0 = time.perf_counter()
    tok = Tokenizer.train(docs, args.vocab)
    t_train = time.perf_counter() - t0
    print(f"train  vocab {tok.vocab_size}: {t_train:6.2f} s   (bar <= 20 s)  {'ok' if t_train <= 20 else 'SLOW'}")

    tok = Tokenizer.from_json(tok.to_json())  # fresh tokenizer: empty pre-token cache
    t0 = time.perf_counter()
    batch = tok.encode_batch(docs)
    t_batch = time.perf_counter() - t0
    ntokens = sum(map(len, batch))
    rate = nbytes / t_batch / 1e6
    print(f"encode_batch (cold cache): {rate:6.2f} MB/s (bar >= 5 MB/s)  {'ok' if rate >= 5 else 'SLOW'}")

    text = "\n\n".join(docs)
    tok = Tokenizer.from_json(tok.to_json())
    t0 = time.perf_counter()
    ids = tok.encode(text)
    t_one = time.perf_counter() - t0
    print(f"encode one {len(text.encode()) / 1e6:.1f} MB string: {len(text.encode()) / t_one / 1e6:6.2f} MB/s")
    print(f"bytes per token: {nbytes / ntokens:.3f}")

    t0 = time.perf_counter()
    back = tok.decode(ids)
    t_dec = time.perf_counter() - t0
    assert back == text, "decode(encode(text)) != text"
    print(f"decode: {len(text.encode()) / t_dec / 1e6:6.1f} MB/s (round trip exact)")

    try:
        import tokenizers
    except ImportError:
        print("(Hugging Face tokenizers not installed: no comparison)")
        return
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tokenizer.json")
        tok.save(path)
        hf = tokenizers.Tokenizer.from_file(path)
    t0 = time.perf_counter()
    hf_batch = hf.encode_batch(docs)
    t_hf = time.perf_counter() - t0
    same = sum(e.ids == o for e, o in zip(hf_batch, batch))
    print(f"HF tokenizers {tokenizers.__version__} on our tokenizer.json: encode_batch {nbytes / t_hf / 1e6:.2f} MB/s, "
          f"identical ids on {same:,}/{len(docs):,} documents")
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=args.vocab, show_progress=False,
                                             special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t0 = time.perf_counter()
    model.train_from_iterator(docs, trainer)
    print(f"HF train vocab {args.vocab}: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
