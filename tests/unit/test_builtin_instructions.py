import re

import pytest

from lowbit.builtin_instructions import (
    ANTONYM_PAIRS, ANTONYMS, BUILTIN_INSTRUCTIONS, CAPITALS, FAMILIES, FAMILY_NAMES, PLURALS, RHYME_GROUPS, RHYMES,
    TRANSLATIONS, WORDS, count_combinations, generate_instructions,
)


@pytest.fixture(scope="module")
def frame():
    return generate_instructions(3000, seed=7, family=True)


def test_same_rows_and_seed_give_the_same_frame_and_another_seed_differs():
    a, b = generate_instructions(400, seed=3), generate_instructions(400, seed=3)
    assert a.equals(b)
    assert not a.equals(generate_instructions(400, seed=4))
    # a shorter call is a prefix of a longer one with the same seed
    assert generate_instructions(100, seed=3).equals(a.iloc[:100])


def test_columns_and_non_empty_fields(frame):
    assert list(generate_instructions(5, seed=0).columns) == ["instruction", "input", "output"]
    assert list(frame.columns) == ["instruction", "input", "output", "family"]
    assert (frame.instruction.str.strip() != "").all() and (frame.output.str.strip() != "").all()
    assert frame.input.notna().all()
    assert BUILTIN_INSTRUCTIONS["instructions"] is generate_instructions


def test_every_family_is_covered_and_most_records_have_no_input(frame):
    assert 8 <= len(FAMILY_NAMES) <= 12
    counts = frame.family.value_counts()
    assert set(counts.index) == set(FAMILY_NAMES)
    assert counts.min() > 0.5 * len(frame) / len(FAMILY_NAMES)
    share = (frame.input != "").mean()
    assert 0.1 < share < 0.4
    assert (frame[frame.family == "sorting"].input != "").all()
    for fam in FAMILIES:  # several phrasings, and each one is used
        assert 2 <= len(fam.phrasings) <= 4
        rows = frame[frame.family == fam.name]
        used = {i for i, (instr, _) in enumerate(fam.phrasings)
                if rows.instruction.str.fullmatch(_template_regex(instr)).any()}
        assert used == set(range(len(fam.phrasings))), fam.name


def _template_regex(template: str) -> str:
    return re.sub(r"\\\{\w+\\\}", ".+", re.escape(template))


def test_instruction_and_input_never_repeat_within_a_call(frame):
    assert not frame.duplicated(["instruction", "input"]).any()


def test_small_universe_is_drawn_to_exhaustion_without_repeats(monkeypatch):
    import lowbit.builtin_instructions as bi

    small = tuple(f for f in FAMILIES if f.name in ("rhyme", "capital"))
    monkeypatch.setattr(bi, "FAMILIES", small)
    total = bi.count_combinations()
    assert total == (len(RHYMES) + len(CAPITALS)) * 3
    df = bi.generate_instructions(total, seed=1)
    assert len(df) == total and not df.duplicated(["instruction", "input"]).any()
    with pytest.raises(ValueError, match="only"):
        bi.generate_instructions(total + 1, seed=1)


def test_records_are_short(frame):
    text = frame.instruction + " " + frame.input + " " + frame.output
    assert text.str.split().str.len().max() <= 30
    assert text.str.len().max() <= 160
    assert count_combinations() > 100_000


def test_tables_are_consistent():
    assert len(ANTONYMS) == 2 * len(ANTONYM_PAIRS)  # no word in two pairs
    assert all(ANTONYMS[ANTONYMS[w]] == w for w in ANTONYMS)
    assert len(RHYMES) == sum(len(g) for g in RHYME_GROUPS)  # no word in two rhyme groups
    assert len(set(WORDS)) == len(WORDS) and all(w.isalpha() and w.islower() and 3 <= len(w) <= 7 for w in WORDS)
    assert len(CAPITALS) >= 40 and len(PLURALS) >= 40 and len(TRANSLATIONS) >= 40


def test_pinned_facts():
    assert CAPITALS["France"] == "Paris" and CAPITALS["Japan"] == "Tokyo" and CAPITALS["Australia"] == "Canberra"
    assert CAPITALS["Canada"] == "Ottawa" and CAPITALS["Switzerland"] == "Bern"
    assert ANTONYMS["hot"] == "cold" and ANTONYMS["cold"] == "hot" and ANTONYMS["early"] == "late"
    assert PLURALS["mouse"] == "mice" and PLURALS["child"] == "children" and PLURALS["city"] == "cities"
    assert PLURALS["sheep"] == "sheep" and PLURALS["knife"] == "knives"
    assert TRANSLATIONS["red"] == ("rouge", "rojo") and TRANSLATIONS["seven"] == ("sept", "siete")
    assert TRANSLATIONS["Wednesday"] == ("mercredi", "miércoles")
    assert RHYMES["cat"] == "hat"


def test_outputs_restate_the_subject_and_follow_the_tables(frame):
    by = {name: frame[frame.family == name] for name in FAMILY_NAMES}
    for row in by["capital"].itertuples():
        country, capital = re.fullmatch(r"The capital of (.+) is (.+)\.", row.output).groups()
        assert CAPITALS[country] == capital and country in row.instruction
    for row in by["opposite"].itertuples():
        word, opposite = re.fullmatch(r"The opposite of '(.+)' is '(.+)'\.", row.output).groups()
        assert ANTONYMS[word] == opposite and f"'{word}'" in row.instruction
    for row in by["plural"].itertuples():
        word, plural = re.fullmatch(r"The plural of '(.+)' is '(.+)'\.", row.output).groups()
        assert PLURALS[word] == plural
    for row in by["translation"].itertuples():
        word, lang, target = re.fullmatch(r"'(.+)' in (French|Spanish) is '(.+)'\.", row.output).groups()
        assert TRANSLATIONS[word][("French", "Spanish").index(lang)] == target
        assert lang in row.instruction and word in row.instruction + row.input
    for row in by["uppercase"].itertuples():
        word, upper = re.fullmatch(r"'(.+)' in uppercase is '(.+)'\.", row.output).groups()
        assert upper == word.upper() and word in row.instruction + row.input
    for row in by["spelling"].itertuples():
        word, letters = re.fullmatch(r"'(.+)' is spelled (.+)\.", row.output).groups()
        assert letters.split("-") == list(word)
    for row in by["letter_count"].itertuples():
        word, n = re.fullmatch(r"'(.+)' has (\d+) letters\.", row.output).groups()
        assert int(n) == len(word)
    for row in by["first_last_letter"].itertuples():
        pos, word, letter = re.fullmatch(r"The (first|last) letter of '(.+)' is '(.)'\.", row.output).groups()
        assert letter == (word[0] if pos == "first" else word[-1])
        assert pos in row.instruction or {"first": "start", "last": "end"}[pos] in row.instruction
    for row in by["rhyme"].itertuples():
        rhyme, word = re.fullmatch(r"'(.+)' rhymes with '(.+)'\.", row.output).groups()
        assert RHYMES[word] == rhyme and rhyme != word


def test_arithmetic_is_correct_in_every_arithmetic_record(frame):
    for name, op, fn in (("addition", "plus", int.__add__), ("subtraction", "minus", int.__sub__)):
        rows = frame[frame.family == name]
        assert len(rows) > 100
        for row in rows.itertuples():
            a, b, result = map(int, re.fullmatch(rf"(\d+) {op} (\d+) equals (\d+)\.", row.output).groups())
            assert fn(a, b) == result and result > 0
            numbers = re.findall(r"\d+", row.instruction + " " + row.input)
            assert sorted(map(int, numbers)) == sorted([a, b])


def test_sorted_outputs_are_sorted_permutations_of_the_input(frame):
    rows = frame[frame.family == "sorting"]
    assert set(rows.output.str.split(":").str[0]) == {"In ascending order", "In descending order"}
    for row in rows.itertuples():
        order, listed = re.fullmatch(r"In (ascending|descending) order: (.+)\.", row.output).groups()
        got = [int(x) for x in listed.split(", ")]
        given = [int(x) for x in row.input.split(", ")]
        assert len(given) == 3 and len(set(given)) == 3
        assert got == sorted(given, reverse=order == "descending")
        assert order in row.instruction or ("largest to smallest" if order == "descending" else "smallest to largest") in row.instruction


def test_held_out_records_are_mostly_unseen(frame):
    train, test = frame.iloc[:500], frame.iloc[500:700]
    assert not test.set_index(["instruction", "input"]).index.isin(train.set_index(["instruction", "input"]).index).any()
    assert test.output.isin(set(train.output)).mean() < 0.4
