"""Builtin instruction dataset: short instruction / input / output records generated deterministically.

`builtin:instructions` — twelve small task families (uppercase a word, opposite of a word,
capital of a country, plural of a noun, add two numbers, subtract two numbers, spell a word,
count its letters, first or last letter, translate a word to French or Spanish, sort three
numbers, give a rhyme), meant for instruction tuning a tiny chat model on a CPU in minutes,
both forward (instruction (+ input) -> output) and reversed (output (+ input) -> instruction,
"instruction backtranslation").

How a record is made (so that both directions are learnable from a few hundred records,
while exact match stays below 100% and test records are mostly unseen):
1. A family is drawn uniformly among the twelve (among those not yet used up).
2. An item of that family is drawn: a word from a list of ~95, a country of 60, a pair of
   numbers from 1..99, three distinct numbers from 1..99 and a direction, a word and a
   language, ... The tables below are written by hand and are facts (checked in tests).
3. One of the family's 3-4 phrasings of the instruction is drawn. Some phrasings put the
   subject in the `input` field ("Add these two numbers." / "17, 25"); sorting always does;
   most records have an empty `input`.
4. The output restates the subject and the task ("The opposite of 'hot' is 'cold'.",
   "17 plus 25 equals 42."), so the instruction can be recovered from it up to the phrasing.
5. An (instruction, input) already drawn is drawn again, so a call never repeats one while
   rows <= `count_combinations()`; asking for more raises ValueError.
Every record is short: at most ~25 words and ~40 BPE tokens for instruction, input and output
together. The same (rows, seed) always gives the same rows, in the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import pandas as pd

# Common nouns and adjectives, 3 to 7 letters, lowercase (uppercase, spelling, letter counts, first/last letter).
WORDS = [
    "apple", "house", "river", "garden", "tiger", "pencil", "window", "bottle", "candle", "forest",
    "guitar", "planet", "rabbit", "silver", "winter", "yellow", "castle", "dragon", "flower", "jacket",
    "kitten", "lemon", "monkey", "number", "ocean", "pepper", "rocket", "sugar", "table", "turtle",
    "violin", "wallet", "zebra", "basket", "bridge", "button", "carpet", "cherry", "cloud", "doctor",
    "engine", "farmer", "finger", "hammer", "island", "ladder", "market", "mirror", "needle", "parrot",
    "pillow", "puzzle", "rainbow", "shadow", "spider", "stone", "sunset", "ticket", "tomato", "tunnel",
    "valley", "wizard", "anchor", "banana", "camera", "dinner", "eagle", "feather", "giraffe", "helmet",
    "insect", "jungle", "kettle", "lizard", "magnet", "noodle", "pirate", "quilt", "robot", "salmon",
    "teapot", "velvet", "walnut", "yogurt", "cat", "dog", "sun", "map", "cup", "book",
    "fish", "bird", "green", "quiet", "happy",
]

# Antonym pairs; every word appears once, and each pair is used in both directions.
ANTONYM_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
    ("open", "closed"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"),
    ("old", "young"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("thick", "thin"),
    ("loud", "quiet"), ("clean", "dirty"), ("heavy", "light"), ("up", "down"), ("left", "right"),
    ("true", "false"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("begin", "end"),
    ("above", "below"), ("inside", "outside"), ("day", "night"), ("love", "hate"), ("friend", "enemy"),
    ("cheap", "expensive"), ("wide", "narrow"), ("deep", "shallow"), ("sweet", "sour"), ("first", "last"),
    ("remember", "forget"), ("arrive", "leave"), ("question", "answer"), ("north", "south"), ("east", "west"),
    ("always", "never"), ("summer", "winter"), ("black", "white"), ("brave", "cowardly"), ("laugh", "cry"),
]
ANTONYMS = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}

# Country (as written mid-sentence) -> capital city. Countries with a disputed or split capital are left out.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "the Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Estonia": "Tallinn",
    "Latvia": "Riga", "Lithuania": "Vilnius", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Ghana": "Accra", "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Senegal": "Dakar", "Japan": "Tokyo",
    "China": "Beijing", "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "the Philippines": "Manila", "Nepal": "Kathmandu",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Peru": "Lima", "Cuba": "Havana", "Uruguay": "Montevideo", "Venezuela": "Caracas",
    "Ecuador": "Quito",
}

# Singular -> plural, regular and irregular.
PLURALS = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "chair": "chairs", "star": "stars",
    "box": "boxes", "bus": "buses", "fox": "foxes", "church": "churches", "dish": "dishes", "glass": "glasses",
    "watch": "watches", "brush": "brushes", "bench": "benches", "city": "cities", "baby": "babies",
    "party": "parties", "story": "stories", "lady": "ladies", "family": "families", "key": "keys",
    "toy": "toys", "day": "days", "boy": "boys", "leaf": "leaves", "knife": "knives", "wife": "wives",
    "wolf": "wolves", "half": "halves", "loaf": "loaves", "shelf": "shelves", "life": "lives",
    "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "photo": "photos", "piano": "pianos",
    "child": "children", "mouse": "mice", "man": "men", "woman": "women", "tooth": "teeth", "foot": "feet",
    "goose": "geese", "person": "people", "ox": "oxen", "sheep": "sheep", "deer": "deer", "house": "houses",
}

# English word -> (French, Spanish).
TRANSLATIONS = {
    "red": ("rouge", "rojo"), "blue": ("bleu", "azul"), "green": ("vert", "verde"), "yellow": ("jaune", "amarillo"),
    "black": ("noir", "negro"), "white": ("blanc", "blanco"), "orange": ("orange", "naranja"),
    "purple": ("violet", "morado"), "pink": ("rose", "rosa"), "brown": ("marron", "marrón"), "grey": ("gris", "gris"),
    "one": ("un", "uno"), "two": ("deux", "dos"), "three": ("trois", "tres"), "four": ("quatre", "cuatro"),
    "five": ("cinq", "cinco"), "six": ("six", "seis"), "seven": ("sept", "siete"), "eight": ("huit", "ocho"),
    "nine": ("neuf", "nueve"), "ten": ("dix", "diez"), "eleven": ("onze", "once"), "twelve": ("douze", "doce"),
    "thirteen": ("treize", "trece"), "fourteen": ("quatorze", "catorce"), "fifteen": ("quinze", "quince"),
    "sixteen": ("seize", "dieciséis"), "seventeen": ("dix-sept", "diecisiete"), "eighteen": ("dix-huit", "dieciocho"),
    "nineteen": ("dix-neuf", "diecinueve"), "twenty": ("vingt", "veinte"),
    "Monday": ("lundi", "lunes"), "Tuesday": ("mardi", "martes"), "Wednesday": ("mercredi", "miércoles"),
    "Thursday": ("jeudi", "jueves"), "Friday": ("vendredi", "viernes"), "Saturday": ("samedi", "sábado"),
    "Sunday": ("dimanche", "domingo"),
    "dog": ("chien", "perro"), "cat": ("chat", "gato"), "horse": ("cheval", "caballo"), "cow": ("vache", "vaca"),
    "water": ("eau", "agua"), "bread": ("pain", "pan"), "house": ("maison", "casa"), "book": ("livre", "libro"),
}
LANGUAGES = ("French", "Spanish")

# Groups of words that rhyme; the answer for a word is the next word of its group (cyclically).
RHYME_GROUPS = [
    ("cat", "hat", "bat", "mat"), ("dog", "log", "fog", "frog"), ("cake", "lake", "make", "bake"),
    ("ring", "king", "sing", "wing"), ("light", "night", "bright", "kite"), ("moon", "soon", "spoon", "noon"),
    ("tree", "free", "bee", "sea"), ("star", "car", "far", "jar"), ("book", "look", "cook", "hook"),
    ("rain", "train", "brain", "chain"), ("bell", "well", "tell", "shell"), ("cold", "gold", "bold", "old"),
    ("fun", "sun", "run", "bun"), ("day", "play", "way", "say"), ("hand", "sand", "land", "band"),
    ("pin", "win", "tin", "fin"), ("bug", "rug", "mug", "hug"), ("rock", "sock", "clock", "lock"),
    ("boat", "coat", "goat", "float"), ("house", "mouse"), ("fox", "box"), ("bed", "red", "head", "bread"),
]
RHYMES = {w: group[(i + 1) % len(group)] for group in RHYME_GROUPS for i, w in enumerate(group)}

NUMBERS = range(1, 100)


@dataclass(frozen=True)
class Family:
    """A task: `size` items, `item(i)` gives item i's template fields; each phrasing is (instruction, input)."""

    name: str
    size: int
    item: Callable[[int], dict]
    phrasings: tuple[tuple[str, str], ...]
    output: str

    def record(self, index: int, phrasing: int) -> tuple[str, str, str]:
        fields = self.item(index)
        instruction, input_ = self.phrasings[phrasing]
        return instruction.format(**fields), input_.format(**fields), self.output.format(**fields)


def _listed(values: list[dict]) -> tuple[int, Callable[[int], dict]]:
    return len(values), values.__getitem__


def _sort_item(index: int) -> dict:
    # index -> three distinct numbers of NUMBERS in drawn order, and a direction (mixed radix)
    pool = list(NUMBERS)
    nums = []
    for _ in range(3):
        index, pick = divmod(index, len(pool))
        nums.append(pool.pop(pick))
    descending = bool(index)
    ordered = sorted(nums, reverse=descending)
    return {
        "nums": ", ".join(map(str, nums)), "sorted": ", ".join(map(str, ordered)),
        "order": "descending" if descending else "ascending",
        "span": "largest to smallest" if descending else "smallest to largest",
    }


def _pair_item(index: int) -> dict:
    a, b = NUMBERS[index // len(NUMBERS)], NUMBERS[index % len(NUMBERS)]
    return {"a": a, "b": b, "sum": a + b}


SUBTRACTIONS = [{"a": a, "b": b, "diff": a - b} for a in NUMBERS for b in NUMBERS if b < a]
N = len(NUMBERS)

FAMILIES = (
    Family("uppercase", *_listed([{"w": w, "up": w.upper()} for w in WORDS]), (
        ("Write '{w}' in capital letters.", ""),
        ("Convert '{w}' to uppercase.", ""),
        ("Make the word '{w}' uppercase.", ""),
        ("Convert the following word to uppercase.", "{w}"),
    ), "'{w}' in uppercase is '{up}'."),
    Family("opposite", *_listed([{"w": w, "a": a} for w, a in ANTONYMS.items()]), (
        ("Give the opposite of '{w}'.", ""),
        ("What is the opposite of '{w}'?", ""),
        ("Name a word that means the opposite of '{w}'.", ""),
    ), "The opposite of '{w}' is '{a}'."),
    Family("capital", *_listed([{"c": c, "cap": cap} for c, cap in CAPITALS.items()]), (
        ("What is the capital of {c}?", ""),
        ("Name the capital city of {c}.", ""),
        ("Which city is the capital of {c}?", ""),
    ), "The capital of {c} is {cap}."),
    Family("plural", *_listed([{"w": w, "p": p} for w, p in PLURALS.items()]), (
        ("What is the plural of '{w}'?", ""),
        ("Give the plural form of '{w}'.", ""),
        ("Write the plural of the word '{w}'.", ""),
    ), "The plural of '{w}' is '{p}'."),
    Family("addition", N * N, _pair_item, (
        ("What is {a} plus {b}?", ""),
        ("Add {a} and {b}.", ""),
        ("Compute the sum of {a} and {b}.", ""),
        ("Add these two numbers.", "{a}, {b}"),
    ), "{a} plus {b} equals {sum}."),
    Family("subtraction", *_listed(SUBTRACTIONS), (
        ("What is {a} minus {b}?", ""),
        ("Subtract {b} from {a}.", ""),
        ("Take {b} away from {a}.", ""),
        ("Subtract the second number from the first.", "{a}, {b}"),
    ), "{a} minus {b} equals {diff}."),
    Family("spelling", *_listed([{"w": w, "letters": "-".join(w)} for w in WORDS]), (
        ("Spell '{w}' letter by letter.", ""),
        ("Spell out the word '{w}'.", ""),
        ("Spell the word '{w}' one letter at a time.", ""),
    ), "'{w}' is spelled {letters}."),
    Family("letter_count", *_listed([{"w": w, "n": len(w)} for w in WORDS]), (
        ("How many letters are in '{w}'?", ""),
        ("Count the letters in the word '{w}'.", ""),
        ("How many letters does '{w}' have?", ""),
    ), "'{w}' has {n} letters."),
    Family("first_last_letter", *_listed([
        {"w": w, "pos": pos, "verb": verb, "letter": w[i]}
        for w in WORDS for pos, verb, i in (("first", "start", 0), ("last", "end", -1))
    ]), (
        ("What is the {pos} letter of '{w}'?", ""),
        ("Which letter does '{w}' {verb} with?", ""),
        ("Give the {pos} letter of the word '{w}'.", ""),
    ), "The {pos} letter of '{w}' is '{letter}'."),
    Family("translation", *_listed([
        {"w": w, "lang": lang, "t": targets[k]} for w, targets in TRANSLATIONS.items() for k, lang in enumerate(LANGUAGES)
    ]), (
        ("Translate '{w}' into {lang}.", ""),
        ("What is '{w}' in {lang}?", ""),
        ("How do you say '{w}' in {lang}?", ""),
        ("Translate the following word into {lang}.", "{w}"),
    ), "'{w}' in {lang} is '{t}'."),
    Family("sorting", N * (N - 1) * (N - 2) * 2, _sort_item, (
        ("Sort these numbers in {order} order.", "{nums}"),
        ("Arrange these numbers from {span}.", "{nums}"),
        ("Put these numbers in {order} order.", "{nums}"),
    ), "In {order} order: {sorted}."),
    Family("rhyme", *_listed([{"w": w, "r": r} for w, r in RHYMES.items()]), (
        ("Give a word that rhymes with '{w}'.", ""),
        ("What rhymes with '{w}'?", ""),
        ("Name a word that rhymes with '{w}'.", ""),
    ), "'{r}' rhymes with '{w}'."),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def count_combinations() -> int:
    """How many distinct (instruction, input) a call can give: items x phrasings, summed over families."""
    return sum(f.size * len(f.phrasings) for f in FAMILIES)


def generate_instructions(rows: int, seed: int, *, family: bool = False) -> pd.DataFrame:
    """`rows` records with columns instruction, input ("" when none), output (+ family if asked)."""
    total = count_combinations()
    if rows > total:
        raise ValueError(f"asked for {rows} rows; only {total} distinct (instruction, input) exist")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    used = [set() for _ in FAMILIES]  # (item, phrasing) pairs drawn per family, duplicates included
    records = []
    while len(records) < rows:
        open_families = [k for k, f in enumerate(FAMILIES) if len(used[k]) < f.size * len(f.phrasings)]
        if not open_families:  # only reachable if two families produced the same (instruction, input)
            raise ValueError(f"only {len(records)} distinct (instruction, input) could be drawn")
        k = rng.choice(open_families)
        fam = FAMILIES[k]
        pick = (rng.randrange(fam.size), rng.randrange(len(fam.phrasings)))
        if pick in used[k]:
            continue
        used[k].add(pick)
        instruction, input_, output = fam.record(*pick)
        if (instruction, input_) in seen:
            continue
        seen.add((instruction, input_))
        records.append((instruction, input_, output, fam.name))
    frame = pd.DataFrame(records, columns=["instruction", "input", "output", "family"])
    return frame if family else frame.drop(columns="family")


BUILTIN_INSTRUCTIONS = {"instructions": generate_instructions}
