"""ChatGLMTokenizer against spec §4 (tokenizer) and §5 (chat prompt), loaded the way users load it.

The SentencePiece model comes from conftest.py. Expected ids are built from that model directly
(`sentencepiece.SentencePieceProcessor`) plus the spec's layout: special ids follow the pieces,
the prefix is `[gMASK] sop`, padding is on the left.
"""

import copy
import importlib.util
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import jinja2
import pytest
import sentencepiece
import torch
import transformers
from transformers import AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / "tests" / "data" / "bilingual_corpus.txt"

SPECIAL_NAMES = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
TEXTS = [
    "你好，很高兴认识你。",
    "Good morning! How did you sleep?",
    "我今天学了20个new words。",
    "[Round 1]\n\n问：今天星期几？\n\n答：今天是星期五。",
]
CHAT_ERRORS = (jinja2.exceptions.TemplateError, ValueError)


def load(folder, **kwargs):
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, **kwargs)


def copy_folder(source, destination):
    shutil.copytree(source, destination)
    return destination


@pytest.fixture(scope="module")
def sp(sentencepiece_model_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model_path))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load(tokenizer_dir)


@pytest.fixture(scope="module")
def prefix(sp):
    """`[gMASK] sop` for this vocabulary: pieces + 1, pieces + 3."""
    return [sp.get_piece_size() + 1, sp.get_piece_size() + 3]


def as_messages(query, history):
    messages = []
    for old_query, response in history:
        messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": response}]
    return messages + [{"role": "user", "content": query}]


# --- loading and vocabulary -------------------------------------------------------------------


def test_autotokenizer_loads_the_slow_remote_code_tokenizer_with_left_padding(tokenizer):
    assert type(tokenizer).__name__ == "ChatGLMTokenizer"
    assert not tokenizer.is_fast
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_input_names == ["input_ids", "attention_mask", "position_ids"]
    assert tokenizer.clean_up_tokenization_spaces is False


def test_vocabulary_is_the_pieces_followed_by_five_special_tokens_in_order(tokenizer, sp):
    pieces = sp.get_piece_size()
    assert tokenizer.vocab_size == len(tokenizer) == pieces + 5
    special_ids = list(range(pieces, pieces + 5))
    assert [tokenizer.get_command(name) for name in SPECIAL_NAMES] == special_ids
    assert tokenizer.convert_ids_to_tokens(special_ids) == SPECIAL_NAMES
    assert tokenizer.build_inputs_with_special_tokens([]) == [tokenizer.vocab_size - 4, tokenizer.vocab_size - 2]
    not_pieces = [name for name in SPECIAL_NAMES if sp.piece_to_id(name) == sp.unk_id()]
    assert {"[MASK]", "[gMASK]", "[sMASK]"} <= set(not_pieces)
    commands = [tokenizer.get_command(name) for name in not_pieces]
    assert tokenizer.convert_tokens_to_ids(not_pieces) == [tokenizer.get_vocab()[name] for name in not_pieces] == commands


def test_get_command_gives_bos_eos_and_pad_and_rejects_unknown_names(tokenizer):
    assert tokenizer.get_command("<bos>") == 1
    assert tokenizer.get_command("<eos>") == 2
    assert tokenizer.get_command("<pad>") == 0
    with pytest.raises(ValueError, match="'<cls>' is not a ChatGLM2 special token"):
        tokenizer.get_command("<cls>")


def test_pad_is_unk_and_eos_is_end_of_sentence_as_released(tokenizer):
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)


def test_tokens_ids_and_vocabulary_agree_with_sentencepiece(tokenizer, sp):
    for text in TEXTS:
        pieces = sp.encode(text, out_type=str)
        ids = sp.encode(text)
        assert tokenizer.tokenize(text) == pieces
        assert tokenizer.convert_tokens_to_ids(pieces) == ids
        assert tokenizer.convert_ids_to_tokens(ids) == pieces
        assert tokenizer.convert_tokens_to_string(pieces) == text
    vocab = tokenizer.get_vocab()
    assert all(vocab[sp.id_to_piece(index)] == index for index in range(sp.get_piece_size()))
    shadowed = [name for name in SPECIAL_NAMES if sp.piece_to_id(name) != sp.unk_id()]
    assert len(vocab) == tokenizer.vocab_size - len(shadowed)


# --- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + [""])
def test_encoding_puts_gmask_sop_before_the_sentencepiece_ids(tokenizer, sp, prefix, text):
    assert tokenizer.encode(text) == prefix + sp.encode(text)
    assert tokenizer(text)["input_ids"] == prefix + sp.encode(text)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_pair_encodes_as_prefix_first_second_eos(tokenizer, sp, prefix):
    first, second = "问：你好", "答：你好！"
    assert tokenizer(first, second)["input_ids"] == prefix + sp.encode(first) + sp.encode(second) + [2]


@pytest.mark.parametrize(
    "text",
    ["x </s> y <s> z <unk>", "[gMASK]sop 你好 [MASK] [sMASK] eop", "people read philosophy and geopolitics"],
)
def test_special_token_names_written_in_text_stay_text(tokenizer, sp, text):
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_piece_spelled_like_a_special_token_keeps_its_sentencepiece_id(tokenizer, sp):
    eop_piece = sp.piece_to_id("eop")
    assert eop_piece != sp.unk_id(), "the trained model should have an ordinary 'eop' piece (a BPE merge)"
    ids = tokenizer("geopolitics", add_special_tokens=False)["input_ids"]
    assert eop_piece in ids and ids == sp.encode("geopolitics")
    assert tokenizer.convert_tokens_to_ids("eop") == tokenizer.get_vocab()["eop"] == eop_piece
    assert tokenizer.get_command("eop") == sp.get_piece_size() + 4


def test_special_tokens_mask_and_token_type_ids_line_up_with_the_inputs(tokenizer, prefix):
    first, second = [11, 12], [13]
    assert tokenizer.build_inputs_with_special_tokens(first) == prefix + first
    assert tokenizer.build_inputs_with_special_tokens(first, second) == prefix + first + second + [2]
    assert tokenizer.get_special_tokens_mask(first) == [1, 1, 0, 0]
    assert tokenizer.get_special_tokens_mask(first, second) == [1, 1, 0, 0, 0, 1]
    assert tokenizer.get_special_tokens_mask([0, 0] + prefix + first + [2], already_has_special_tokens=True) == [
        1, 1, 1, 1, 0, 0, 1,
    ]  # fmt: skip
    assert tokenizer.create_token_type_ids_from_sequences(first, second) == [0] * 6
    assert tokenizer.num_special_tokens_to_add() == 2
    assert tokenizer.num_special_tokens_to_add(pair=True) == 3
    encoded = tokenizer("你好", "再见", return_special_tokens_mask=True, return_token_type_ids=True)
    assert len(encoded["special_tokens_mask"]) == len(encoded["token_type_ids"]) == len(encoded["input_ids"])
    assert encoded["special_tokens_mask"][:2] == [1, 1] and encoded["special_tokens_mask"][-1] == 1


# --- attention mask, position ids, padding, truncation ----------------------------------------


def test_single_encoding_has_ids_attention_mask_and_position_ids(tokenizer):
    encoded = tokenizer(TEXTS[0])
    length = len(encoded["input_ids"])
    assert set(encoded) == {"input_ids", "attention_mask", "position_ids"}
    assert encoded["attention_mask"] == [1] * length
    assert encoded["position_ids"] == list(range(length))


def expected_left_padded(rows, length):
    return {
        "input_ids": [[0] * (length - len(row)) + row for row in rows],
        "attention_mask": [[0] * (length - len(row)) + [1] * len(row) for row in rows],
        "position_ids": [[0] * (length - len(row)) + list(range(len(row))) for row in rows],
    }


def test_batch_is_padded_on_the_left_with_positions_counting_real_tokens(tokenizer, sp, prefix):
    texts = ["你好", "Good morning! How did you sleep?"]
    rows = [prefix + sp.encode(text) for text in texts]
    expected = expected_left_padded(rows, max(map(len, rows)))
    assert dict(tokenizer(texts, padding=True)) == expected
    tensors = tokenizer(texts, padding=True, return_tensors="pt")
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == torch.long
        assert tensors[key].tolist() == value


def test_single_text_with_return_tensors_is_a_batch_of_one(tokenizer, sp, prefix):
    tensors = tokenizer("你好", return_tensors="pt")
    row = prefix + sp.encode("你好")
    assert tensors["input_ids"].tolist() == [row]
    assert tensors["position_ids"].tolist() == [list(range(len(row)))]


def test_truncation_keeps_the_prefix_and_max_length_padding_goes_on_the_left(tokenizer, sp, prefix):
    long_text, short_text = TEXTS[1], "你好"
    assert len(sp.encode(long_text)) > 6
    assert tokenizer(long_text, truncation=True, max_length=8)["input_ids"] == prefix + sp.encode(long_text)[:6]
    batch = tokenizer([short_text, long_text], truncation=True, max_length=8, padding="max_length")
    rows = [prefix + sp.encode(short_text), prefix + sp.encode(long_text)[:6]]
    assert dict(batch) == expected_left_padded(rows, 8)
    assert len(tokenizer(short_text, padding="max_length", max_length=5, pad_to_multiple_of=4)["input_ids"]) == 8


def test_pad_left_pads_features_and_keeps_or_computes_position_ids(tokenizer, sp, prefix):
    features = [tokenizer(text) for text in TEXTS[:2]]
    padded = tokenizer.pad(features, return_tensors="pt")
    direct = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    assert set(padded) == set(direct)
    for key in direct:
        assert torch.equal(padded[key], direct[key])

    without_positions = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in features]
    assert tokenizer.pad(without_positions)["position_ids"] == direct["position_ids"].tolist()

    row = prefix + sp.encode("你好")
    already_padded = {"input_ids": [[0, 0] + row], "attention_mask": [[0, 0] + [1] * len(row)]}
    repadded = tokenizer.pad(already_padded, padding="max_length", max_length=len(row) + 4)
    assert repadded["position_ids"] == [[0] * 4 + list(range(len(row)))]


def expected_right_padded(rows, length):
    return {
        "input_ids": [row + [0] * (length - len(row)) for row in rows],
        "attention_mask": [[1] * len(row) + [0] * (length - len(row)) for row in rows],
        "position_ids": [list(range(len(row))) + [0] * (length - len(row)) for row in rows],
    }


def test_right_padding_pads_right_however_it_is_asked_for(tokenizer_dir, sp, prefix):
    """LLaMA-Factory loads tokenizers with padding_side="right" for training; the positions of the
    real tokens stay 0..n-1 on either side."""
    texts = TEXTS[:2]
    rows = [prefix + sp.encode(text) for text in texts]
    right = expected_right_padded(rows, max(map(len, rows)))
    loaded_right = load(tokenizer_dir, padding_side="right")
    assert loaded_right.padding_side == "right"
    assert dict(loaded_right(texts, padding=True)) == right
    assert dict(loaded_right.pad([loaded_right(text) for text in texts])) == right

    tokenizer = load(tokenizer_dir)
    assert dict(tokenizer(texts, padding=True, padding_side="right")) == right
    assert dict(tokenizer.pad([tokenizer(text) for text in texts], padding_side="right")) == right
    assert dict(tokenizer(texts, padding=True)) == expected_left_padded(rows, max(map(len, rows)))
    tokenizer.padding_side = "right"
    assert dict(tokenizer(texts, padding=True)) == right
    assert dict(loaded_right(texts, padding=True, padding_side="left")) == expected_left_padded(rows, max(map(len, rows)))
    with pytest.raises(ValueError, match="padding_side"):
        tokenizer(texts, padding=True, padding_side="middle")


def test_right_padding_works_with_the_base_classes_pad_as_llama_factory_installs_it(tokenizer_dir, sp, prefix):
    """LLaMA-Factory replaces `_pad` with PreTrainedTokenizerBase's: no position_ids then (the model
    counts them from the mask), ids and mask padded on the right."""
    from types import MethodType

    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    tokenizer = load(tokenizer_dir, padding_side="right")
    tokenizer._pad = MethodType(PreTrainedTokenizerBase._pad, tokenizer)
    rows = [prefix + sp.encode(text) for text in TEXTS[:2]]
    features = [{"input_ids": row, "attention_mask": [1] * len(row)} for row in rows]
    batch = tokenizer.pad(features, return_tensors="pt")
    expected = expected_right_padded(rows, max(map(len, rows)))
    assert batch["input_ids"].tolist() == expected["input_ids"]
    assert batch["attention_mask"].tolist() == expected["attention_mask"]


# --- decoding ---------------------------------------------------------------------------------


def test_decode_skipping_special_tokens_drops_them_bos_eos_and_pad(tokenizer, sp, prefix):
    for text in TEXTS:
        ids = sp.encode(text)
        assert tokenizer.decode(prefix + ids, skip_special_tokens=True) == text
        assert tokenizer.decode([0, 0] + prefix + [1] + ids + [2], skip_special_tokens=True) == text
        assert tokenizer.decode(torch.tensor(prefix + ids), skip_special_tokens=True) == text
        assert tokenizer.decode_reply([0, 0] + prefix + [1] + ids + [2]) == text
    padded = tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    assert tokenizer.batch_decode(padded, skip_special_tokens=True) == TEXTS
    every_special = list(range(sp.get_piece_size(), sp.get_piece_size() + 5))
    assert tokenizer.decode(every_special + [0, 1, 2], skip_special_tokens=True) == ""
    assert tokenizer.decode_reply(every_special + [0, 1, 2]) == ""


def test_decode_keeps_special_tokens_text_unless_told_to_skip_them(tokenizer, sp, prefix):
    """transformers' convention, which lm-eval relies on: it adds decode([eos], skip_special_tokens=False)
    to its stop strings, and an empty text there cut every answer after its first token."""
    assert tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) == "</s>"
    assert tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False) == "</s>"  # lm-eval passes the int
    assert tokenizer.decode([tokenizer.eos_token_id]) == "</s>"
    ids = sp.encode("你好")
    assert tokenizer.decode([0] + prefix + ids + [2]) == "<unk>[gMASK]sop你好</s>"
    every_special = list(range(sp.get_piece_size(), sp.get_piece_size() + 5))
    assert tokenizer.decode(every_special + [1]) == "[MASK][gMASK][sMASK]sopeop<s>"
    assert tokenizer.convert_tokens_to_string(["[gMASK]", "sop"] + sp.encode("你好", out_type=str)) == "[gMASK]sop你好"
    padded = tokenizer(TEXTS[:2], padding=True)["input_ids"]
    assert tokenizer.batch_decode(padded) == [
        "<unk>" * (len(padded[0]) - 2 - len(sp.encode(text))) + "[gMASK]sop" + text for text in TEXTS[:2]
    ]


def test_ids_outside_the_vocabulary_decode_to_nothing(tokenizer, sp, prefix):
    outside = [64900, tokenizer.vocab_size, tokenizer.vocab_size + 100, -100]
    assert tokenizer.decode(outside) == ""
    assert tokenizer.decode(outside, skip_special_tokens=True) == ""
    text_ids = sp.encode("你好") + sp.encode("再见")
    assert tokenizer.decode(text_ids[:2] + outside + text_ids[2:]) == sp.decode(text_ids)
    assert tokenizer.batch_decode([[-100, -100] + sp.encode("你好")]) == ["你好"]
    # As the published tokenizer converts them: "" (llama.cpp's converter marks those ids unused).
    assert tokenizer.convert_ids_to_tokens(outside) == [""] * len(outside)
    # Tools that detokenize through tokens (vLLM's slow-tokenizer path) get decode's text, not "<unk>".
    ids = prefix + text_ids[:2] + outside + text_ids[2:] + [tokenizer.eos_token_id]
    assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)) == tokenizer.decode(ids)


def test_published_sptokenizer_surface(tokenizer, sp, prefix):
    """`tokenizer.tokenizer`, the published SPTokenizer's attributes, on ChatGLM2's five special tokens."""
    sp_layer = tokenizer.tokenizer
    assert sp_layer.sp_model.serialized_model_proto() == sp.serialized_model_proto()
    assert sp_layer.n_words == sp.get_piece_size() + 5 == tokenizer.vocab_size
    assert (sp_layer.bos_id, sp_layer.eos_id, sp_layer.pad_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert sp_layer.special_tokens == {name: sp.get_piece_size() + i for i, name in enumerate(SPECIAL_NAMES)}
    # ChatGLM3's fine-tuning demo and OpenVINO's tokenizer converter read the inverse map.
    assert sp_layer.index_special_tokens == {sp.get_piece_size() + i: name for i, name in enumerate(SPECIAL_NAMES)}
    for text in TEXTS:
        assert sp_layer.encode(text) == sp.encode(text)
        assert sp_layer.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
        assert sp_layer.tokenize(text) == sp.encode(text, out_type=str)
        assert sp_layer.decode(sp.encode(text)) == text
    assert sp_layer.encode("[gMASK]") == sp.encode("[gMASK]")
    assert sp_layer.decode(prefix + sp.encode("你好")) == "[gMASK]sop你好"
    assert sp_layer.convert_token_to_id("[gMASK]") == prefix[0] == tokenizer.get_command("[gMASK]")
    assert sp_layer.convert_id_to_token(prefix[1]) == "sop"
    assert sp_layer.convert_id_to_token(sp.get_piece_size() + 5) == ""
    piece = sp.id_to_piece(100)
    assert (sp_layer.convert_token_to_id(piece), sp_layer.convert_id_to_token(100)) == (100, piece)


def test_decoding_keeps_spaces_before_punctuation(tokenizer, sp):
    text = "Hello , world . Really ?"
    assert tokenizer.decode(sp.encode(text)) == text
    assert tokenizer.decode(sp.encode(text), clean_up_tokenization_spaces=True) == "Hello, world. Really?"


# --- added tokens -----------------------------------------------------------------------------


def test_adding_tokens_is_refused_while_a_piece_is_spelled_like_a_special_token(tokenizer_dir):
    tokenizer = load(tokenizer_dir)
    with pytest.raises(ValueError, match=r"Cannot add \['<tool>'\].*'eop'"):
        tokenizer.add_tokens(["<tool>"])
    assert tokenizer.add_special_tokens({"eos_token": "</s>"}) == 0
    assert len(tokenizer) == tokenizer.vocab_size


def test_added_tokens_get_ids_after_the_special_tokens(tmp_path, tokenizer_dir, train_sentencepiece_model):
    corpus = CORPUS.read_text(encoding="utf-8").splitlines()
    lines = [line for line in corpus if line and "sop" not in line.lower() and "eop" not in line.lower()]
    folder = copy_folder(tokenizer_dir, tmp_path / "no_shadow")
    (folder / "tokenizer.model").write_bytes(train_sentencepiece_model(lines, 1200))
    tokenizer = load(folder)
    assert tokenizer.vocab_size == 1205

    assert tokenizer.add_tokens(["<tool>"]) == 1
    assert tokenizer.convert_tokens_to_ids("<tool>") == 1205 and len(tokenizer) == 1206
    ids = tokenizer("天气<tool>很好", add_special_tokens=False)["input_ids"]
    assert 1205 in ids
    assert tokenizer.decode(ids) == "天气<tool>很好"


# --- chat prompt ------------------------------------------------------------------------------

TWO_TURNS = [("你好", "你好！有什么可以帮你的吗？"), ("讲个笑话", "为什么数学书总是很忧伤？")]


def test_build_prompt_without_history_is_round_one(tokenizer):
    assert tokenizer.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert tokenizer.build_prompt("你好", []) == "[Round 1]\n\n问：你好\n\n答："


def test_build_prompt_numbers_rounds_from_one_with_full_width_colons(tokenizer):
    assert tokenizer.build_prompt("谢谢", TWO_TURNS) == (
        "[Round 1]\n\n问：你好\n\n答：你好！有什么可以帮你的吗？\n\n"
        "[Round 2]\n\n问：讲个笑话\n\n答：为什么数学书总是很忧伤？\n\n"
        "[Round 3]\n\n问：谢谢\n\n答："
    )


def test_build_prompt_rejects_history_entries_that_are_not_pairs(tokenizer):
    with pytest.raises(ValueError, match=r"history\[1\] must be a \(query, response\) pair"):
        tokenizer.build_prompt("谢谢", [("a", "b"), ("only a query",)])


@pytest.mark.parametrize("turns", [0, 1, 2])
def test_chat_template_renders_the_build_prompt_text(tokenizer, turns):
    history = TWO_TURNS[:turns]
    rendered = tokenizer.apply_chat_template(as_messages("谢谢", history), add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer.build_prompt("谢谢", history)


def test_chat_template_in_tokenizer_config_renders_the_same_text_in_plain_jinja(tokenizer):
    template = json.loads((REPO_ROOT / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert tokenizer.chat_template == template
    assert "sop" not in template
    messages = as_messages("谢谢", TWO_TURNS)
    for environment in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        compiled = environment.from_string(template)
        assert compiled.render(messages=messages, add_generation_prompt=True) == tokenizer.build_prompt(
            "谢谢", TWO_TURNS
        )


def test_released_tokenizer_config_without_a_template_still_renders_the_chat_prompt(tmp_path, tokenizer_dir):
    folder = copy_folder(tokenizer_dir, tmp_path / "released_config")
    released = {
        "name_or_path": "THUDM/chatglm2-6b",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(released))
    tokenizer = load(folder)
    shipped = json.loads((REPO_ROOT / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert tokenizer.chat_template == shipped
    messages = as_messages("谢谢", TWO_TURNS)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer.build_prompt("谢谢", TWO_TURNS)
    assert tokenizer.padding_side == "left"


def test_system_message_goes_before_round_one_and_an_empty_one_adds_nothing(tokenizer):
    messages = as_messages("你好", [])
    with_system = [{"role": "system", "content": "你是一个乐于助人的助手。"}] + messages
    assert tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False) == (
        "你是一个乐于助人的助手。\n\n[Round 1]\n\n问：你好\n\n答："
    )
    empty_system = [{"role": "system", "content": ""}] + messages
    assert tokenizer.apply_chat_template(empty_system, add_generation_prompt=True, tokenize=False) == (
        tokenizer.build_prompt("你好")
    )


def test_conversation_ending_with_the_assistant_renders_complete_rounds(tokenizer):
    messages = as_messages("你好", []) + [{"role": "assistant", "content": "你好！"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[Round 1]\n\n问：你好\n\n答：你好！\n\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True) == (
        "[Round 1]\n\n问：你好\n\n答：你好！"
    )


USER = {"role": "user", "content": "你好"}
ASSISTANT = {"role": "assistant", "content": "你好！"}


@pytest.mark.parametrize(
    ("messages", "add_generation_prompt", "problem"),
    [
        ([], True, "empty"),
        ([ASSISTANT], False, r"messages\[0\] is an assistant message"),
        ([USER, USER], True, r"messages\[1\] is a user message"),
        ([USER, ASSISTANT, ASSISTANT], False, r"messages\[2\] is an assistant message"),
        ([{"role": "robot", "content": "hi"}], True, 'unknown role "robot"'),
        ([{"content": "hi"}], True, r'messages\[0\] has no string "role"'),
        ([{"role": "user"}], True, 'needs a string "content"'),
        ([{"role": "user", "content": None}], True, 'needs a string "content"'),
        ([{"role": "user", "content": 5}], True, 'needs a string "content"'),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], True, 'needs a string "content"'),
        ([USER, {"role": "system", "content": "x"}], False, r"messages\[1\] is a system message, which is only allowed"),
        ([USER, ASSISTANT], True, 'last message to be from the user, it is from "assistant"'),
        ([{"role": "system", "content": "x"}], True, 'last message to be from the user, it is from "system"'),
    ],
)
def test_malformed_conversation_is_rejected_naming_the_problem(tokenizer, messages, add_generation_prompt, problem):
    with pytest.raises(CHAT_ERRORS, match=problem):
        tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def test_tokenized_chat_equals_the_tokenizer_on_build_prompt_prefix_included(tokenizer, prefix):
    messages = as_messages("谢谢", TWO_TURNS)
    expected = tokenizer(tokenizer.build_prompt("谢谢", TWO_TURNS))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == expected["input_ids"] and ids[:2] == prefix
    encoding = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert dict(encoding) == dict(expected)
    tensors = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert tensors["input_ids"].tolist() == [expected["input_ids"]]
    default = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # transformers 4.x returns the ids unless told, 5.x the encoding.
    returns_dict = int(transformers.__version__.split(".")[0]) >= 5
    assert (default["input_ids"] if returns_dict else default) == expected["input_ids"]


def test_tokenized_chat_batch_is_left_padded_with_position_ids(tokenizer):
    conversations = [as_messages("谢谢", TWO_TURNS), as_messages("你好", [])]
    batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True, return_dict=True)
    prompts = [tokenizer.build_prompt("谢谢", TWO_TURNS), tokenizer.build_prompt("你好")]
    assert dict(batch) == dict(tokenizer(prompts, padding=True))
    assert batch["input_ids"][1][0] == 0 and batch["position_ids"][1][-1] == len(tokenizer(prompts[1])["input_ids"]) - 1


# --- saving, pickling, broken files -----------------------------------------------------------


def test_save_pretrained_round_trip_keeps_tokenizer_model_byte_identical(tmp_path, tokenizer, sentencepiece_model_path):
    saved = tmp_path / "saved"
    tokenizer.save_pretrained(saved)
    assert (saved / "tokenizer.model").read_bytes() == sentencepiece_model_path.read_bytes()
    reloaded = load(saved)
    assert reloaded.padding_side == "left"
    assert reloaded.chat_template == tokenizer.chat_template
    assert dict(reloaded(TEXTS, padding=True)) == dict(tokenizer(TEXTS, padding=True))
    assert reloaded.build_prompt("谢谢", TWO_TURNS) == tokenizer.build_prompt("谢谢", TWO_TURNS)


def test_save_vocabulary_writes_the_loaded_model_once_the_file_is_gone(tmp_path, tokenizer_dir):
    original = (tokenizer_dir / "tokenizer.model").read_bytes()
    folder = copy_folder(tokenizer_dir, tmp_path / "source")
    tokenizer = load(folder)
    (folder / "tokenizer.model").unlink()
    target = tmp_path / "target"
    target.mkdir()
    (path,) = tokenizer.save_vocabulary(str(target), filename_prefix="copy")
    assert os.path.basename(path) == "copy-tokenizer.model"
    assert (target / "copy-tokenizer.model").read_bytes() == original
    with pytest.raises(ValueError, match="needs an existing directory"):
        tokenizer.save_vocabulary(str(tmp_path / "missing"))


def test_pickled_and_copied_tokenizers_work_without_their_files(tmp_path, tokenizer_dir):
    folder = copy_folder(tokenizer_dir, tmp_path / "to_delete")
    tokenizer = load(folder)
    expected = dict(tokenizer(TEXTS, padding=True))
    payload = pickle.dumps(tokenizer)
    shutil.rmtree(folder)
    for clone in (pickle.loads(payload), copy.deepcopy(tokenizer)):
        assert dict(clone(TEXTS, padding=True)) == expected
        assert clone.batch_decode(expected["input_ids"], skip_special_tokens=True) == TEXTS


def test_missing_tokenizer_model_error_names_the_file_and_folder(tmp_path, tokenizer_dir):
    folder = copy_folder(tokenizer_dir, tmp_path / "no_model")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match=f"'tokenizer.model'.*{re.escape(str(folder))}"):
        load(folder)


def test_corrupt_tokenizer_model_error_names_the_path(tmp_path, tokenizer_dir):
    folder = copy_folder(tokenizer_dir, tmp_path / "corrupt")
    (folder / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=f"could not read the SentencePiece model .*{re.escape(str(folder))}"):
        load(folder)


# --- released keyword arguments ---------------------------------------------------------------


def test_released_kwargs_are_off_by_default_and_take_effect_when_on(tokenizer_dir, tokenizer, sp, prefix):
    assert (tokenizer.remove_space, tokenizer.do_lower_case, tokenizer.encode_special_tokens) == (False, False, False)
    assert load(tokenizer_dir, do_lower_case=True).encode("HELLO World") == prefix + sp.encode("hello world")
    assert load(tokenizer_dir, remove_space=True).encode("a   b \n c") == prefix + sp.encode("a b c")
    specials = load(tokenizer_dir, encode_special_tokens=True)
    gmask, mask = sp.get_piece_size() + 1, sp.get_piece_size()
    assert specials.encode("[gMASK]你好[MASK]", add_special_tokens=False) == [gmask] + sp.encode("你好") + [mask]
    assert specials.encode("sop eop", add_special_tokens=False) == sp.encode("sop eop")


def test_importing_and_constructing_writes_no_files_and_touches_no_environment(tmp_path, sentencepiece_model_path):
    folder = tmp_path / "module_only"
    folder.mkdir()
    shutil.copy(REPO_ROOT / "tokenization_chatglm.py", folder / "tokenization_chatglm.py")
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    before = sorted(os.listdir(folder))
    environment = dict(os.environ)
    spec = importlib.util.spec_from_file_location("side_effect_probe", folder / "tokenization_chatglm.py")
    module = importlib.util.module_from_spec(spec)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes_bytecode
    tokenizer = module.ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"))
    assert tokenizer.decode(tokenizer("你好")["input_ids"], skip_special_tokens=True) == "你好"
    assert sorted(os.listdir(folder)) == before
    assert dict(os.environ) == environment


# --- user text is text ------------------------------------------------------------------------

SPECIAL_STRINGS = ["<unk>", "<s>", "</s>", "[gMASK]", "sop", "[MASK]", "[sMASK]", "eop", "<unk></s>", " </s> ", "isopropyl"]


def test_get_prefix_tokens_are_gmask_then_sop(tokenizer, prefix):
    assert tokenizer.get_prefix_tokens() == prefix
    assert tokenizer("hi")["input_ids"][:2] == prefix


@pytest.mark.parametrize("text", SPECIAL_STRINGS)
def test_text_that_is_exactly_a_special_string_stays_text(tokenizer, sp, text):
    """transformers alone turns a text equal to `</s>` or `<unk>` into that control id, which then
    vanishes on decode; the released tokenizer left all text to SentencePiece."""
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == "[gMASK]sop" + text


def test_saved_and_reloaded_tokenizer_encodes_special_strings_identically(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    for text in SPECIAL_STRINGS + TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_lone_surrogate_is_refused_as_invalid_unicode(tokenizer):
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer("a\ud800b")
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer.build_chat_input("a\ud800b")


def test_continuation_input_is_the_tail_of_the_whole_prompt(tokenizer):
    whole = tokenizer.build_chat_input("谢谢", TWO_TURNS)
    continuation = tokenizer.build_chat_input("谢谢", TWO_TURNS, continuation=True)
    fed = continuation["input_ids"][0].tolist()
    assert whole["input_ids"][0].tolist()[-len(fed) :] == fed
    assert tokenizer.decode(fed) == "\n\n[Round 3]\n\n问：谢谢\n\n答："
    assert continuation["attention_mask"].tolist() == [[1] * len(fed)]


def test_token_text_is_each_token_as_it_stands_inside_a_text(tokenizer, sp):
    # What a server shows per token (log probabilities): the word marker is the space before the
    # word, a byte-fallback piece is its name and its one byte, a special token its name.
    ids = tokenizer("Hello world. 😀", add_special_tokens=False)["input_ids"]
    texts = [tokenizer.token_text(index) for index in ids]
    bytes_ = [index for index in ids if sp.is_byte(index)]
    assert len(bytes_) == 4  # the emoji is not a piece: four UTF-8 bytes
    assert "".join(text for index, (text, _) in zip(ids, texts) if index not in bytes_) == " Hello world. "
    assert b"".join(bytes(data) for _, data in texts) == " Hello world. 😀".encode("utf-8")
    assert [tokenizer.token_text(index)[0] for index in bytes_] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    eos = tokenizer.eos_token_id
    assert tokenizer.token_text(eos) == (tokenizer.convert_ids_to_tokens(eos), list(tokenizer.convert_ids_to_tokens(eos).encode()))
    assert tokenizer.token_text(len(tokenizer) + 5) == ("", [])
