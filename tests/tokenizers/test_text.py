import ml_collections
import pytest

from unimm.data.corpus import corpus
from unimm.tokenizers import text


@pytest.fixture(scope="module")
def tok():
    return text.load("scenes")


def test_shipped_model_is_rebuilt_identically():
    assert text.build_scenes_model() == text.SCENES_MODEL.read_bytes()


def test_every_scene_text_round_trips_without_unknowns(tok):
    for sentence in corpus():
        ids = tok.encode(sentence)
        assert text.UNK not in ids and tok.decode(ids) == sentence
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)


def test_captions_are_short(tok):
    assert max(len(tok.encode(c)) for c in corpus()) <= 16
    assert len(tok.encode("a red circle")) == 3  # whole words


def test_decode_skips_specials_and_out_of_vocabulary_ids(tok):
    ids = [tok.bos_id] + tok.encode("a red circle") + [tok.eos_id, tok.vocab_size + 1]
    assert tok.decode(ids) == "a red circle"


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
        text.load("sentencepiece", str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="needs config.tokenizer.path"):
        text.load("sentencepiece")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        text.load("bpe")
    cfg = ml_collections.ConfigDict({"kind": "scenes", "path": "", "vocab_size": 100})
    with pytest.raises(ValueError, match="vocab_size=128"):
        text.load_checked(cfg)
