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


@pytest.fixture(scope="module")
def llama_style_model(tmp_path_factory):
    """A SentencePiece model laid out like Llama-2's: unk 0, bos 1, eos 2 and no pad piece."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("spm") / "nopad.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.Train(sentence_iterator=iter(corpus()), model_writer=f, vocab_size=96,
                                       model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                       pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return path


def test_a_model_without_a_pad_piece_pads_with_eos(llama_style_model):
    tok = text.load("sentencepiece", str(llama_style_model))
    assert tok.sp.pad_id() == -1
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    ids = tok.encode("a red circle")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "a red circle"


def test_the_7b_config_loads_a_tokenizer_without_pad(llama_style_model):
    """configs/transfusion_7b.py's command with a Llama-style model (shapes of the
    real vocabulary are not needed: the tokenizer only has to load and encode)."""
    import importlib.util
    import pathlib

    import numpy as np

    from unimm import objectives
    from unimm.data.shapes import ShapesSource

    configs = pathlib.Path(__file__).resolve().parents[2] / "configs"
    spec = importlib.util.spec_from_file_location("tf7b", configs / "transfusion_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    tok = text.load("sentencepiece", str(llama_style_model))
    cfg.tokenizer.update(path=str(llama_style_model), vocab_size=tok.vocab_size)
    obj = objectives.build(cfg)
    assert obj.tok.pad_id == tok.eos_id
    doc = obj.document(ShapesSource(resolution=256)[0], np.random.default_rng(0), "text")
    assert doc["tokens"][0] == tok.bos_id and doc["tokens"][-1] == tok.eos_id
    assert tok.decode(doc["tokens"]).startswith("a ")  # the prose, read back
    prompts, lengths = obj._pad([[tok.bos_id, 5, 6, 7], [tok.bos_id]])
    assert list(prompts[1]) == [tok.bos_id, tok.eos_id, tok.eos_id, tok.eos_id] and list(lengths) == [4, 1]
