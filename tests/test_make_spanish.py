"""scripts/make_spanish.py: the shipped espanol.txt is what the script writes, and its Spanish agrees."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_spanish import adjective, conjugate  # noqa: E402


def test_the_shipped_corpus_is_the_scripts_output(tmp_path):
    out = tmp_path / "espanol.txt"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_spanish.py"), "--out", str(out)], check=True, cwd=ROOT)
    assert out.read_bytes() == (ROOT / "espanol.txt").read_bytes()


def test_agreement_and_conjugation():
    assert [adjective("pequeño", f, p) for f in (False, True) for p in (False, True)] == [
        "pequeño",
        "pequeños",
        "pequeña",
        "pequeñas",
    ]
    assert [adjective(word, True, True) for word in ("fácil", "feliz", "verde")] == ["fáciles", "felices", "verdes"]
    assert [conjugate("vivir", "present", person) for person in range(6)] == [
        "vivo",
        "vives",
        "vive",
        "vivimos",
        "vivís",
        "viven",
    ]
    assert [conjugate(verb, "past", 0) for verb in ("buscar", "comer", "cantar")] == ["busqué", "comí", "canté"]


def test_articles_agree_with_the_nouns_they_name():
    text = (ROOT / "espanol.txt").read_text(encoding="utf-8")
    assert 400_000 < len(text.encode()) < 1_000_000
    assert re.search(r"\bla (niño|perro|libro|árbol|camino)\b", text) is None
    assert re.search(r"\blos (niña|gata|casa|flor|ciudad)s?\b", text) is None
    assert text.count("Capítulo ") == 400
