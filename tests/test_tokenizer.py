from flywheel.vla.tokenizer import Tokenizer


def test_encode_decode_round_trip():
    tok = Tokenizer()
    ids = tok.encode("Push the RED block onto the green pad!")
    assert tok.decode(ids) == "push the red block onto the green pad"


def test_unknown_words_map_to_unk_and_batches_are_padded():
    tok = Tokenizer(max_len=12)
    ids, mask = tok(["put the blue block in the bowl", "wiggle the frobnicator"])
    assert ids.shape == (2, 12) and mask.shape == (2, 12)
    assert mask[0].sum() == 7 and mask[1].sum() == 3
    assert ids[1, 0] == tok.unk_id and ids[1, 2] == tok.unk_id
    assert (ids[0, 7:] == tok.pad_id).all()


def test_colours_get_distinct_ids():
    tok = Tokenizer()
    colours = ["red", "green", "blue", "yellow"]
    assert len({tok.encode(c)[0] for c in colours}) == 4


def test_long_instructions_are_truncated():
    tok = Tokenizer(max_len=4)
    ids, mask = tok(["push the red block onto the green pad"])
    assert ids.shape == (1, 4) and mask.all()


def test_every_suite_instruction_is_in_vocabulary_and_fits():
    from actors.instructions import TEMPLATES, combinations

    tok = Tokenizer()
    for kind, templates in TEMPLATES.items():
        for template in templates:
            for combo in combinations(kind):
                ids = tok.encode(template.format(**dict(zip("bt", combo))))
                assert tok.unk_id not in ids, template
                assert len(Tokenizer.words(template.format(**dict(zip("bt", combo))))) <= tok.max_len, template
