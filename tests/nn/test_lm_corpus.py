"""The bundled corpus of the language model: two public-domain novels, intact."""

import hashlib

import pytest

from moekit.datasets import load_austen

# the checksums stated in moekit/datasets/data/README.md
SHA256 = {
    "pride_and_prejudice": "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
    "persuasion": "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
}


@pytest.mark.parametrize("book", sorted(SHA256))
def test_each_novel_is_the_text_the_readme_describes(book):
    text = load_austen([book])
    assert hashlib.sha256(text.encode("ascii")).hexdigest() == SHA256[book]


def test_the_default_corpus_is_both_novels_in_order():
    text = load_austen()
    assert len(text) == 684_768 + 1 + 466_854
    assert text.startswith("PRIDE AND PREJUDICE") and text.rstrip().endswith("Finis")
    assert "It is a truth universally acknowledged" in text[:200]


def test_unknown_books_are_named():
    with pytest.raises(ValueError, match=r"'books' parameter of load_austen.*'emma'"):
        load_austen(["emma"])
    with pytest.raises(ValueError, match="'books' parameter"):
        load_austen([])
