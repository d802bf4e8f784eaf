"""Text tokenizers: SentencePiece models with bos and eos pieces (the shipped one:
pad=0, unk=1, bos=2, eos=3). A model without a pad piece (Llama-2's) pads with
its eos id: padding is masked by segment ids, never read as text.

- `scenes`: a small model trained on every text of the embedded scene world,
  shipped in the package (assets/scenes.model), so nothing is downloaded. It is
  rebuilt, deterministically, by `python -m unimm.tokenizers.text --build`.
- `sentencepiece`: any SentencePiece model file, e.g. Llama-2's 32k model for
  the paper-sized configs (`config.tokenizer.path`).

Recipes append their own special tokens (BOI, [MASK], ...) after `vocab_size`.
"""

from __future__ import annotations

import argparse
import io
import pathlib

import sentencepiece as spm

SCENES_MODEL = pathlib.Path(__file__).parent / "assets" / "scenes.model"
SCENES_VOCAB_SIZE = 128  # a soft limit: the corpus yields fewer pieces (whole words)
PAD, UNK, BOS, EOS = 0, 1, 2, 3


class TextTokenizer:
    def __init__(self, model: str | pathlib.Path | bytes):
        self.sp = spm.SentencePieceProcessor()
        if isinstance(model, bytes):
            self.sp.LoadFromSerializedProto(model)
        else:
            path = pathlib.Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"no SentencePiece model at {path}; set config.tokenizer.path to a "
                                        f".model file, or use config.tokenizer.kind='scenes'")
            self.sp.Load(str(path))
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError("the SentencePiece model needs bos and eos pieces (train it with --bos_id and --eos_id)")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        """Text of `ids`, ignoring ids outside the text vocabulary and specials."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size
                and int(i) not in (self.pad_id, self.bos_id, self.eos_id)]
        return self.sp.DecodeIds(keep)


def build_scenes_model(vocab_size: int = SCENES_VOCAB_SIZE) -> bytes:
    from unimm.data.corpus import corpus  # build-time only

    out = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus()), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, num_threads=1,
        hard_vocab_limit=False, split_digits=True, normalization_rule_name="identity", minloglevel=2)
    return out.getvalue()


def load(kind: str = "scenes", path: str | None = None) -> TextTokenizer:
    if kind == "scenes":
        return TextTokenizer(SCENES_MODEL)
    if kind == "sentencepiece":
        if not path:
            raise ValueError("config.tokenizer.kind='sentencepiece' needs config.tokenizer.path")
        return TextTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'scenes' or 'sentencepiece'")


def load_checked(cfg) -> TextTokenizer:
    """The tokenizer config.tokenizer describes, its size checked against cfg.vocab_size."""
    tok = load(cfg.kind, cfg.get("path") or None)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"config.tokenizer.vocab_size={cfg.vocab_size} but the {cfg.kind} model has "
                         f"{tok.vocab_size} pieces; set --config.tokenizer.vocab_size={tok.vocab_size}")
    return tok


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build or inspect the shipped scene tokenizer.")
    parser.add_argument("--build", action="store_true", help=f"rebuild {SCENES_MODEL}")
    parser.add_argument("--encode", help="print the pieces of a text")
    args = parser.parse_args(argv)
    if args.build:
        SCENES_MODEL.write_bytes(build_scenes_model())
        print(f"wrote {SCENES_MODEL}")
    if args.encode:
        tok = load()
        ids = tok.encode(args.encode)
        print(ids, [tok.sp.IdToPiece(i) for i in ids])


if __name__ == "__main__":
    main()
