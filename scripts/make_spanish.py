"""Write espanol.txt: short Spanish stories from a small grammar, a non-English corpus for the benchmarks.

Public domain by construction: every word list, rule and sentence is written here, and the text is
drawn from them with a fixed seed, so the same command always writes the same file (the one shipped
beside input.txt). It is not literature: it is Spanish morphology a small model can learn (gender
and number agreement of articles, nouns and adjectives; regular verbs in the present and the
preterite, six persons), in UTF-8 with accents, ñ and inverted marks, as paragraphs of prose.

    python scripts/make_spanish.py [--out espanol.txt] [--chapters 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from smollm2.files import write_atomic

# (singular, plural, feminine?)
NOUNS = [
    ("niño", "niños", False),
    ("niña", "niñas", True),
    ("perro", "perros", False),
    ("gata", "gatas", True),
    ("casa", "casas", True),
    ("libro", "libros", False),
    ("árbol", "árboles", False),
    ("flor", "flores", True),
    ("ciudad", "ciudades", True),
    ("río", "ríos", False),
    ("montaña", "montañas", True),
    ("pan", "panes", False),
    ("maestra", "maestras", True),
    ("pescador", "pescadores", False),
    ("canción", "canciones", True),
    ("ventana", "ventanas", True),
    ("camino", "caminos", False),
    ("mesa", "mesas", True),
    ("caballo", "caballos", False),
    ("estrella", "estrellas", True),
    ("jardín", "jardines", False),
    ("carta", "cartas", True),
    ("médico", "médicos", False),
    ("abuela", "abuelas", True),
    ("barco", "barcos", False),
    ("llave", "llaves", True),
]
PEOPLE = [noun for noun in NOUNS if noun[0] in {"niño", "niña", "maestra", "pescador", "médico", "abuela"}]
# adjectives ending in -o take four forms; the others only number
ADJECTIVES = [
    "pequeño",
    "viejo",
    "nuevo",
    "blanco",
    "rojo",
    "alto",
    "bonito",
    "tranquilo",
    "oscuro",
    "limpio",
    "grande",
    "verde",
    "alegre",
    "triste",
    "fácil",
    "azul",
    "feliz",
    "amable",
]
# regular verbs: (infinitive, a fitting complement kind): "thing" takes a noun phrase, "place" a place
VERBS = [
    ("mirar", "thing"),
    ("buscar", "thing"),
    ("comprar", "thing"),
    ("llevar", "thing"),
    ("cantar", "thing"),
    ("caminar", "place"),
    ("trabajar", "place"),
    ("descansar", "place"),
    ("comer", "thing"),
    ("beber", "thing"),
    ("aprender", "thing"),
    ("vender", "thing"),
    ("correr", "place"),
    ("escribir", "thing"),
    ("abrir", "thing"),
    ("vivir", "place"),
    ("subir", "place"),
    ("recibir", "thing"),
]
ENDINGS = {
    ("ar", "present"): ["o", "as", "a", "amos", "áis", "an"],
    ("er", "present"): ["o", "es", "e", "emos", "éis", "en"],
    ("ir", "present"): ["o", "es", "e", "imos", "ís", "en"],
    ("ar", "past"): ["é", "aste", "ó", "amos", "asteis", "aron"],
    ("er", "past"): ["í", "iste", "ió", "imos", "isteis", "ieron"],
    ("ir", "past"): ["í", "iste", "ió", "imos", "isteis", "ieron"],
}
PRONOUNS = ["yo", "tú", None, "nosotros", "vosotros", None]  # persons 3 and 6 are said by a noun phrase
PLACES = [
    "en el jardín",
    "junto al río",
    "por el camino",
    "en la ciudad",
    "cerca de la montaña",
    "en casa",
    "bajo los árboles",
    "en el mercado",
    "al lado de la ventana",
    "en la plaza",
]
TIMES = {
    "present": ["Hoy", "Ahora", "Cada mañana", "Por la tarde", "Todos los días"],
    "past": ["Ayer", "Anoche", "El lunes", "Aquel verano", "Hace mucho tiempo"],
}
LINKS = ["y", "pero", "porque", "mientras", "cuando"]


def adjective(word: str, feminine: bool, plural: bool) -> str:
    if word.endswith("o"):
        word = word[:-1] + ("a" if feminine else "o")
    elif word.endswith("z") and plural:
        return word[:-1] + "ces"
    if not plural:
        return word
    return word + ("s" if word[-1] in "aeiou" else "es")  # fácil -> fáciles, azul -> azules


def noun_phrase(rng: random.Random, nouns: list[tuple[str, str, bool]], definite: bool) -> tuple[str, bool]:
    """An article, a noun and maybe an adjective, agreeing; and whether it is plural."""
    singular, plural_form, feminine = rng.choice(nouns)
    plural = rng.random() < 0.35
    articles = ("la", "las", "una", "unas") if feminine else ("el", "los", "un", "unos")
    article = articles[(0 if definite else 2) + plural]
    words = [article, plural_form if plural else singular]
    if rng.random() < 0.6:
        words.append(adjective(rng.choice(ADJECTIVES), feminine, plural))
    return " ".join(words), plural


def conjugate(infinitive: str, tense: str, person: int) -> str:
    stem, kind = infinitive[:-2], infinitive[-2:]
    ending = ENDINGS[kind, tense][person]
    if tense == "past" and person == 0 and infinitive in {"buscar"}:
        stem = stem[:-1] + "qu"  # busqué: the spelling keeps the sound
    return stem + ending


def clause(rng: random.Random, tense: str) -> str:
    person = rng.randrange(6)
    if PRONOUNS[person] is None:
        subject, plural = noun_phrase(rng, PEOPLE, definite=True)
        person = 5 if plural else 2
    else:
        subject = PRONOUNS[person]
    verb, complement = rng.choice(VERBS)
    rest = noun_phrase(rng, NOUNS, definite=rng.random() < 0.5)[0] if complement == "thing" else rng.choice(PLACES)
    return f"{subject} {conjugate(verb, tense, person)} {rest}"


def sentence(rng: random.Random, tense: str) -> str:
    roll = rng.random()
    if roll < 0.12:
        singular, plural_form, feminine = rng.choice(NOUNS)
        plural = rng.random() < 0.35
        article = ("las" if plural else "la") if feminine else ("los" if plural else "el")
        word = adjective(rng.choice(ADJECTIVES), feminine, plural)
        return f"¡Qué {word} {'son' if plural else 'es'} {article} {plural_form if plural else singular}!"
    if roll < 0.24:
        verb, _ = rng.choice(VERBS)
        person = rng.choice([1, 4])
        asker, plural = noun_phrase(rng, PEOPLE, definite=True)
        asked = "preguntaron" if plural else "preguntó"
        return f"—¿Dónde {conjugate(verb, tense, person)} {PRONOUNS[person]}? —{asked} {asker}."
    text = clause(rng, tense)
    if rng.random() < 0.4:
        text += f" {rng.choice(LINKS)} {clause(rng, tense)}"
    if rng.random() < 0.3:
        text = f"{rng.choice(TIMES[tense])}, {text}"
    return text[0].upper() + text[1:] + "."


def chapter(rng: random.Random, number: int) -> str:
    paragraphs = []
    for _ in range(rng.randint(3, 6)):
        tense = rng.choice(["present", "past"])
        paragraphs.append(" ".join(sentence(rng, tense) for _ in range(rng.randint(3, 7))))
    return f"Capítulo {number}\n\n" + "\n\n".join(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="espanol.txt")
    parser.add_argument("--chapters", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    text = "\n\n\n".join(chapter(rng, number) for number in range(1, args.chapters + 1)) + "\n"
    write_atomic(Path(args.out), text)


if __name__ == "__main__":
    main()
