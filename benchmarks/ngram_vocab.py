"""The n-gram expert's exact fast path at vocabularies of 1,024, 8,192 and 50,257 tokens.

Run from the repository root (reads ../shared/data, which the package itself never does):

    python benchmarks/ngram_vocab.py [--repeats 5] [--tokens 1000000]

The real text is the FineWeb validation shard ``fineweb_val_000003.bin`` decoded to its documents with the
official sp1024 model (4.9 MB). It is tokenized three ways, each in ctxmix's lossless text mode: the
shipped sp1024; an sp8192 SentencePiece BPE (byte fallback) trained here on that text; and a GPT-2-sized
byte-level BPE (50,257 ids, the ``tokenizers`` library, saved as a Hugging Face tokenizer directory) trained
here on it too. Each stream's first ``--tokens`` tokens go through ``ngram:threads=1`` (the target's one
thread) and the default ``ngram`` (two threads): tokens/s is the median of ``--repeats`` passes, bytes per
stored entry the tables' memory over their entries at the end of the stream. Prints the machine, library
versions and one table (markdown).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctxmix.bench import expert_throughput, machine_line
from ctxmix.data import default_tokenizer, encode_text, load_tokenizer, read_shard

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARD = SHARED / "fineweb" / "fineweb_val_000003.bin"
SPECS = ("ngram:orders=2-11,table=exact,threads=1", "ngram:orders=2-11,table=exact")
BOS = 1


def fineweb_text() -> str:
    """The shard's documents (the token runs after each BOS), decoded and joined with newlines."""
    tokens = read_shard(SHARD)
    starts = np.flatnonzero(tokens == BOS)
    docs = [tokens[a + 1 : b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]
    return "\n".join(default_tokenizer().decode(docs)) + "\n"


def train_sp8192(text: str, out: Path) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model, model_type="bpe",
                                   vocab_size=8192, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   num_threads=1, max_sentence_length=1 << 20, minloglevel=2)
    out.write_bytes(model.getvalue())
    return out


def train_gpt2_sized(text: str, directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=50_256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(text.splitlines(), trainer=trainer)
    backend.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(directory)
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    (directory / "config.json").write_text(f'{{"vocab_size": {vocab_size}}}\n')  # the size a model would score
    return directory


def versions() -> str:
    import numba
    import sentencepiece
    import tokenizers

    return f"numba {numba.__version__}, sentencepiece {sentencepiece.__version__}, tokenizers {tokenizers.__version__}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    print(f"# n-gram exact fast path by vocabulary\n\n{machine_line()}\n{versions()}\n", flush=True)
    text = fineweb_text()
    data = text.encode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tokenizers = {1024: None, 8192: load_tokenizer(train_sp8192(text, Path(tmp) / "sp8192.model")),
                      50_257: load_tokenizer(train_gpt2_sized(text, Path(tmp) / "bpe50257"))}
        print(f"text: {SHARD.name} decoded, {len(data):,} bytes; tokenizers trained in "
              f"{time.perf_counter() - started:.0f} s\n", flush=True)
        print("| V | tokenizer | tokens | expert | tokens/s (median) | stored entries | bytes/entry |")
        print("|---|---|---|---|---|---|---|")
        for vocab_size, tok in tokenizers.items():
            encoded = encode_text(data, tokenizer=tok, where=SHARD.name)
            tokens = encoded.tokens[: args.tokens + 1]
            name = "sp1024 (shipped)" if tok is None else ("sp8192 BPE" if vocab_size == 8192 else "byte-level BPE")
            assert int(tokens.max()) < vocab_size
            for spec in SPECS:
                s = expert_throughput(spec, tokens, vocab_size, args.repeats, name)
                print(f"| {vocab_size:,} | {name} | {s.tokens:,} | `{spec}` | {s.tokens_per_s:,.0f} | "
                      f"{s.stored_entries:,} | {s.bytes_per_entry:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
