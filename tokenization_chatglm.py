"""Tokenizer of ChatGLM2-6B: a SentencePiece model plus the five GLM special tokens.

The ids it produces are the ones the released weights were trained on: text is encoded by
SentencePiece alone, and `[gMASK] sop` goes in front of every encoded text. Padding is on the
left only, and every encoding carries the `position_ids` the model's rotary embedding reads.
"""

import inspect
import os
import re
import shutil

import sentencepiece
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

VOCAB_FILE_NAME = "tokenizer.model"
# The piece SentencePiece puts in front of a text (its "dummy prefix"), a lone word boundary.
SENTENCEPIECE_SPACE = "\u2581"

# What apply_chat_template(tokenize=True) returns unless told: the ids on 4.x, the encoding on 5.x.
CHAT_RETURNS_DICT_BY_DEFAULT = inspect.signature(PreTrainedTokenizer.apply_chat_template).parameters[
    "return_dict"
].default

# Ids n_pieces .. n_pieces + 4, in this order (spec §4).
GLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

# Only the bracketed names can be recognised in text: "sop" and "eop" also occur inside
# ordinary words ("philosophy", "people").
SPECIAL_TOKENS_IN_TEXT = re.compile("(" + "|".join(re.escape(name) for name in GLM_SPECIAL_TOKENS[:3]) + ")")

# The chat format of spec §5, written once: `build_prompt`, the cache continuation and the Jinja
# template below are all made from these pieces.
ROUND_OPENING = "[Round {number}]\n\n问："
ANSWER_OPENING = "\n\n答："
TURN_END = "\n\n"


def _jinja_string(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The same format as a Jinja template, so that front ends which only read `tokenizer_config.json`
# render the same text as `build_prompt`. Every tag trims the whitespace around it, so the output
# does not depend on the renderer's trim_blocks/lstrip_blocks settings.
CHAT_TEMPLATE = (
    r"""{%- if messages | length == 0 -%}
    {{- raise_exception('ChatGLM2 chat template: the message list is empty') -}}
{%- endif -%}
{%- set system_offset = 1 if messages[0]['role'] == 'system' else 0 -%}
{%- for message in messages -%}
    {%- set where = 'ChatGLM2 chat template: messages[' ~ loop.index0 ~ ']' -%}
    {%- set turn = loop.index0 - system_offset -%}
    {%- if message['role'] is not string -%}
        {{- raise_exception(where ~ ' has no string "role"') -}}
    {%- endif -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception(where ~ ' (role "' ~ message['role'] ~ '") needs a string "content"') -}}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception(where ~ ' is a system message, which is only allowed first') -}}
        {%- endif -%}
        {%- if message['content'] -%}
            {{- message['content'] ~ TURN_END -}}
        {%- endif -%}
    {%- elif message['role'] == 'user' -%}
        {%- if turn % 2 != 0 -%}
            {{- raise_exception(where ~ ' is a user message, but roles must alternate user/assistant'
                ~ ' and an assistant message is expected here') -}}
        {%- endif -%}
        {{- ROUND_OPENING.replace('{number}', (turn // 2 + 1) | string) ~ message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- if turn % 2 != 1 -%}
            {{- raise_exception(where ~ ' is an assistant message, but roles must alternate user/assistant'
                ~ ' and a user message is expected here') -}}
        {%- endif -%}
        {{- ANSWER_OPENING ~ message['content'] ~ TURN_END -}}
    {%- else -%}
        {{- raise_exception(where ~ ' has unknown role "' ~ message['role'] ~ '"'
            ~ ' (expected system, user or assistant)') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if messages[-1]['role'] != 'user' -%}
        {{- raise_exception('ChatGLM2 chat template: add_generation_prompt needs the last message to be'
            ~ ' from the user, it is from "' ~ messages[-1]['role'] ~ '"') -}}
    {%- endif -%}
    {{- ANSWER_OPENING -}}
{%- endif -%}"""
    .replace("ROUND_OPENING", _jinja_string(ROUND_OPENING))
    .replace("ANSWER_OPENING", _jinja_string(ANSWER_OPENING))
    .replace("TURN_END", _jinja_string(TURN_END))
)


def _load_sentencepiece(vocab_file, loading_from):
    """The SentencePiece model in `vocab_file`, or a ValueError naming the file.

    ValueError rather than OSError/RuntimeError: `from_pretrained` replaces those two with a
    generic message that does not say which file is wrong.
    """
    if vocab_file is None or not os.path.isfile(vocab_file):
        raise ValueError(
            f"ChatGLMTokenizer needs the SentencePiece model file {VOCAB_FILE_NAME!r}, but it was not found "
            f"(vocab_file={vocab_file!r}, loading from {loading_from!r})"
        )
    model = sentencepiece.SentencePieceProcessor()
    try:
        model.Load(vocab_file)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"ChatGLMTokenizer could not read the SentencePiece model {vocab_file!r}: {error}") from error
    for role, piece_id in (("<unk>", model.unk_id()), ("<s>", model.bos_id()), ("</s>", model.eos_id())):
        if piece_id < 0:
            raise ValueError(f"The SentencePiece model {vocab_file!r} defines no {role} piece, which ChatGLM2 needs")
    return model


def _require_left(padding_side):
    if padding_side != "left":
        raise ValueError(
            "ChatGLMTokenizer pads on the left only: position_ids count the real tokens from the left "
            f"edge and the model generates after the last one. Got padding_side={padding_side!r}."
        )


def _position_ids(attention_mask, length):
    """0, 1, 2, ... over the real tokens; 0 at padding."""
    if attention_mask is None:
        return list(range(length))
    positions, seen = [], 0
    for is_real in attention_mask:
        positions.append(seen if is_real else 0)
        seen += 1 if is_real else 0
    return positions


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM2-6B tokenizer (slow, SentencePiece).

    Ids: the SentencePiece pieces (`<unk>`=0, `<s>`=1, `</s>`=2 in the release), then `[MASK]`,
    `[gMASK]`, `[sMASK]`, `sop`, `eop`. `vocab_size` and `len()` count both. pad = unk, eos = `</s>`.

    Encoding: text becomes exactly the ids `SentencePieceProcessor.encode` gives; the literal text
    "</s>" or "[gMASK]" in user input stays text. `[gMASK] sop` is put in front; a pair becomes
    `[gMASK] sop A B </s>`. With `encode_special_tokens=True`, the bracketed names `[MASK]`,
    `[gMASK]`, `[sMASK]` written in text become their special ids; "sop" and "eop" never do.

    Piece names: BPE models keep intermediate merges, so "sop" or "eop" can also be an ordinary
    piece. The piece wins: `convert_tokens_to_ids` and `get_vocab` then give the piece's id, which
    keeps tokenize-then-convert equal to SentencePiece. `get_command(name)` always gives the special
    token's id.

    Decoding drops the five special tokens, `<s>`, `</s>` and pad, with or without
    `skip_special_tokens`, so the reply the model ends with `</s>` decodes to its text. Ids that
    are no token of this tokenizer (negative, such as -100 labels, or `>= len(tokenizer)`, such as
    the model's padded rows 64794..65023) decode to nothing; `convert_ids_to_tokens` gives the unk
    token for them.

    Padding is on the left only: asking for right padding (the `padding_side` argument, the
    attribute, or a call's `padding_side=`) raises ValueError.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(
        self,
        vocab_file,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        remove_space=False,
        do_lower_case=False,
        encode_special_tokens=False,
        **kwargs,
    ):
        # transformers asks for the vocabulary inside its constructor, so the model comes first.
        self.vocab_file = vocab_file
        self.sp_model = _load_sentencepiece(vocab_file, kwargs.get("name_or_path"))
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.encode_special_tokens = encode_special_tokens
        unk_piece = self.sp_model.id_to_piece(self.sp_model.unk_id())
        kwargs.setdefault("unk_token", unk_piece)
        kwargs.setdefault("pad_token", unk_piece)
        kwargs.setdefault("eos_token", self.sp_model.id_to_piece(self.sp_model.eos_id()))
        # Folders that carry the released tokenizer_config.json have no template of their own.
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            remove_space=remove_space,
            do_lower_case=do_lower_case,
            encode_special_tokens=encode_special_tokens,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        try:
            return super().from_pretrained(*args, **kwargs)
        except ImportError as error:
            # transformers 4.x wraps the constructor in `except <protobuf's DecodeError>`; without
            # protobuf installed, looking that class up raises an ImportError that hides the
            # constructor's own error (a missing tokenizer.model, a request for right padding).
            if isinstance(error.__context__, ValueError):
                raise error.__context__ from None
            raise

    @property
    def padding_side(self):
        return "left"

    @padding_side.setter
    def padding_side(self, value):
        _require_left(value)

    @property
    def num_pieces(self):
        """Pieces in the SentencePiece model; the special tokens' ids start here."""
        return self.sp_model.get_piece_size()

    @property
    def special_token_ids(self):
        """`{name: id}` of `[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop`."""
        return {name: self.num_pieces + offset for offset, name in enumerate(GLM_SPECIAL_TOKENS)}

    @property
    def vocab_size(self):
        return self.num_pieces + len(GLM_SPECIAL_TOKENS)

    def __len__(self):
        # Counted from ids: get_vocab() is one entry short for each piece spelled like a special token.
        return self.vocab_size + sum(1 for index in self._added_tokens_decoder if index >= self.vocab_size)

    def get_command(self, name):
        """Id of a special token: `[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop`, `<bos>`, `<eos>` or `<pad>`."""
        commands = {
            "<bos>": self.sp_model.bos_id(),
            "<eos>": self.sp_model.eos_id(),
            "<pad>": self.sp_model.unk_id(),
            **self.special_token_ids,
        }
        if name not in commands:
            raise ValueError(f"{name!r} is not a ChatGLM2 special token; known: {', '.join(commands)}")
        return commands[name]

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(index): index for index in range(self.num_pieces)}
        for name, index in self.special_token_ids.items():
            vocab.setdefault(name, index)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _add_tokens(self, new_tokens, special_tokens=False):
        # transformers numbers a new token len(get_vocab()); with a piece spelled like a special
        # token that count is short and the new token would take a special token's id.
        shadowed = [name for name in GLM_SPECIAL_TOKENS if self._convert_token_to_id(name) < self.num_pieces]
        vocab = self.get_vocab()
        new = [str(token) for token in new_tokens or [] if str(token) and str(token) not in vocab]
        if shadowed and new:
            raise ValueError(
                f"Cannot add {new}: this tokenizer.model has ordinary pieces spelled like the special tokens "
                f"{shadowed}, so transformers would give a new token the id of a special token"
            )
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def _update_trie(self, unique_no_split_tokens=None):
        # Only tokens added beyond the vocabulary (`add_tokens`) are matched in text; the released
        # tokenizer left all other text to SentencePiece.
        for index, token in self._added_tokens_decoder.items():
            if index >= self.vocab_size:
                self.tokens_trie.add(token.content)
        for token in unique_no_split_tokens or []:
            self.tokens_trie.add(token)

    def tokenize(self, text, **kwargs):
        """Pieces of `text`. User text is text: the literal strings `</s>`, `<unk>`, `[gMASK]`, `sop`
        become ordinary pieces (transformers would turn a text that equals a special token into that
        token); only tokens added with `add_tokens` are matched, and with `encode_special_tokens=True`
        the bracketed GLM names."""
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        added = {token.content for index, token in self._added_tokens_decoder.items() if index >= self.vocab_size}
        tokens = []
        for chunk in self.tokens_trie.split(text):
            if chunk in added:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self._tokenize(chunk))
        return tokens

    def _tokenize(self, text, dummy_prefix=True, **kwargs):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"ChatGLMTokenizer: the text is not valid Unicode ({error.reason} at position {error.start}: "
                f"{text[error.start:error.end]!r}); lone surrogates cannot be encoded"
            ) from None
        if self.remove_space:
            text = " ".join(text.split())
        if self.do_lower_case:
            text = text.lower()
        if not self.encode_special_tokens:
            chunks = [text]
        else:
            chunks = [chunk for chunk in SPECIAL_TOKENS_IN_TEXT.split(text) if chunk]
        tokens = []
        for chunk in chunks:
            if chunk in GLM_SPECIAL_TOKENS and self.encode_special_tokens:
                tokens.append(chunk)
                continue
            pieces = self.sp_model.encode(chunk, out_type=str)
            if not dummy_prefix and pieces and pieces[0] == SENTENCEPIECE_SPACE and not chunk.startswith(" "):
                # SentencePiece marks the start of a text with a space piece; inside a prompt there is none.
                pieces = pieces[1:]
            tokens.extend(pieces)
            dummy_prefix = True
        return tokens

    def _convert_token_to_id(self, token):
        # SentencePiece answers the unk id for any string that is not one of its pieces.
        piece_id = self.sp_model.piece_to_id(token)
        if piece_id != self.sp_model.unk_id() or token == self.sp_model.id_to_piece(piece_id):
            return piece_id
        return self.special_token_ids.get(token, piece_id)

    def _convert_id_to_token(self, index):
        if 0 <= index < self.num_pieces:
            return self.sp_model.id_to_piece(index)
        if self.num_pieces <= index < self.vocab_size:
            return GLM_SPECIAL_TOKENS[index - self.num_pieces]
        return self.unk_token

    def _ids_dropped_in_decoding(self):
        return {
            self.sp_model.unk_id(),
            self.sp_model.bos_id(),
            self.sp_model.eos_id(),
            *self.special_token_ids.values(),
        }

    def _text_of_ids(self, ids, skip_special_tokens=False):
        """Text of `ids`: runs of pieces go through SentencePiece (which joins byte-fallback pieces
        into characters), added tokens are copied, special and unknown ids are dropped."""
        dropped = self._ids_dropped_in_decoding()
        parts, run = [], []
        for index in ids:
            if index in dropped:
                continue
            if 0 <= index < self.num_pieces:
                run.append(index)
            elif index in self._added_tokens_decoder:
                token = self._added_tokens_decoder[index]
                parts.append(self.sp_model.decode(run))
                run = []
                if not (skip_special_tokens and token.special):
                    parts.append(token.content)
        parts.append(self.sp_model.decode(run))
        return "".join(parts)

    def convert_tokens_to_string(self, tokens):
        return self._text_of_ids(self.convert_tokens_to_ids(tokens))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else [int(index) for index in token_ids]
        text = self._text_of_ids(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = [self.get_command("[gMASK]"), self.get_command("sop")] + token_ids_0
        if token_ids_1 is not None:
            ids += token_ids_1 + [self.get_command("<eos>")]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when the ids already hold their special tokens")
            dropped = self._ids_dropped_in_decoding()
            return [1 if index in dropped else 0 for index in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        """All zeros: ChatGLM2 has no segment embedding."""
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def _pad(
        self,
        encoded_inputs,
        max_length=None,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of=None,
        padding_side=None,
        return_attention_mask=None,
    ):
        """Pad one encoding on the left and give it `position_ids`.

        Positions not passed in are counted from the attention mask, so an encoding that is
        already padded still numbers its real tokens from 0.
        """
        if padding_side is not None:
            _require_left(padding_side)
        main_input = self.model_input_names[0]
        length = len(encoded_inputs[main_input])
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * length
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = _position_ids(encoded_inputs.get("attention_mask"), length)

        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None or max_length <= length:
            return encoded_inputs

        pad_values = {
            main_input: self.pad_token_id,
            "attention_mask": 0,
            "position_ids": 0,
            "token_type_ids": self.pad_token_type_id,
            "special_tokens_mask": 1,
        }
        missing = max_length - length
        for key, pad_value in pad_values.items():
            if key in encoded_inputs:
                encoded_inputs[key] = [pad_value] * missing + list(encoded_inputs[key])
        return encoded_inputs

    @staticmethod
    def _chat_history(history):
        """`history` as a list of (query, response) string pairs, or ValueError/TypeError naming the entry."""
        if history is None:
            return []
        if not isinstance(history, (list, tuple)):
            raise TypeError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
        for index, turn in enumerate(history):
            if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not all(isinstance(text, str) for text in turn):
                raise ValueError(f"history[{index}] must be a (query, response) pair of strings, got {turn!r}")
        return [tuple(turn) for turn in history]

    def build_prompt(self, query, history=None):
        """The chat prompt of spec §5 for `query` after `history`, a list of (query, response) pairs."""
        prompt = ""
        for number, (old_query, response) in enumerate(self._chat_history(history), start=1):
            prompt += ROUND_OPENING.format(number=number) + old_query + ANSWER_OPENING + response + TURN_END
        return prompt + ROUND_OPENING.format(number=len(history or []) + 1) + query + ANSWER_OPENING

    def get_prefix_tokens(self):
        """The ids every prompt starts with: `[gMASK]`, `sop`."""
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_chat_input(self, query, history=None, role="user", continuation=False):
        """Ids of one chat turn as a batch of one (`input_ids`, `attention_mask`, `position_ids`, tensors).

        Without `continuation`: the whole prompt, `[gMASK] sop` + `build_prompt(query, history)`.
        With `continuation=True`: only what follows a cache that holds the conversation so far (the
        earlier prompt and the answer ids), i.e. the tail of the whole prompt's ids from the blank line
        that ends the last answer: `"\n\n[Round n]\n\n问：{query}\n\n答："`, without the prefix and
        without SentencePiece's dummy-prefix piece, which the whole prompt never has there.
        ChatGLM2 has one role, "user".
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if role != "user":
            raise ValueError(f"ChatGLM2 chats as role 'user' only, got role={role!r}")
        history = self._chat_history(history)
        if not continuation or not history:
            return self([self.build_prompt(query, history)], return_tensors="pt")
        text = TURN_END + ROUND_OPENING.format(number=len(history) + 1) + query + ANSWER_OPENING
        ids = self.convert_tokens_to_ids(self._tokenize(text, dummy_prefix=False))
        return self.pad({"input_ids": [ids]}, return_tensors="pt")

    def process_chat_response(self, response, query, history=None, role="user"):
        """(response, history + [(query, response)]) for the decoded answer to `query`.

        The answer is stripped and its `[[训练时间]]` placeholder filled in, as the released model expects.
        """
        response = response.strip().replace("[[训练时间]]", "2023年")
        return response, self._chat_history(history) + [(query, response)]

    def apply_chat_template(
        self,
        conversation,
        tools=None,
        documents=None,
        chat_template=None,
        add_generation_prompt=False,
        continue_final_message=False,
        tokenize=True,
        padding=False,
        truncation=False,
        max_length=None,
        return_tensors=None,
        return_dict=None,
        tokenizer_kwargs=None,
        **kwargs,
    ):
        """Render `conversation` with the chat template and, with `tokenize=True`, encode it the way
        `tokenizer(text)` does, `[gMASK] sop` prefix included (transformers itself would encode the
        rendered text without special tokens).

        Messages alternate user/assistant, starting with the user. A `system` message may come
        first: its content and a blank line go before `[Round 1]`, the layout FastChat's ChatGLM2
        template used, so a front end that always sends a system prompt keeps working and an empty
        one adds nothing. With `add_generation_prompt=True` the text equals
        `build_prompt(last user message, earlier (user, assistant) pairs)`. A conversation ending
        with an assistant message (and `add_generation_prompt=False`) renders every round complete.

        `return_dict=None` follows the installed transformers (4.x returns the ids, 5.x the
        encoding with `attention_mask` and `position_ids`).
        """
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("apply_chat_template needs at least one message, got an empty conversation")
        text = super().apply_chat_template(
            conversation,
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **kwargs,
        )
        if not tokenize:
            return text
        encoding = self(
            text,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        if return_dict is None:
            return_dict = CHAT_RETURNS_DICT_BY_DEFAULT
        return encoding if return_dict else encoding["input_ids"]

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Copy `tokenizer.model` byte for byte; write the loaded model's proto if the file is gone."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary needs an existing directory, got {save_directory!r}")
        target = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME)
        if self.vocab_file is not None and os.path.isfile(self.vocab_file):
            if not (os.path.exists(target) and os.path.samefile(self.vocab_file, target)):
                shutil.copyfile(self.vocab_file, target)
        else:
            with open(target, "wb") as handle:
                handle.write(self.sp_model.serialized_model_proto())
        return (target,)

    def __getstate__(self):
        # The SentencePiece processor is a C++ object; its serialized model travels instead.
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.sp_model = sentencepiece.SentencePieceProcessor()
        self.sp_model.LoadFromSerializedProto(state["sp_model"])



# ChatGLM3 function calling: the model's tool calls, read without running them.
import ast  # noqa: E402  (kept beside its only user)
import math  # noqa: E402

TOOL_CALL_MAX_CHARS = 16384
TOOL_CALL_FENCE = re.compile(r"\A```[ \t]*(?:python)?[ \t]*\n(?P<code>.*)\n[ \t]*```\Z", re.DOTALL)


def parse_tool_call(metadata, content, max_chars=TOOL_CALL_MAX_CHARS):
    """A ChatGLM3 assistant turn calling a tool, as `{"name": ..., "parameters": {...}}`, else `content` unchanged.

    ChatGLM3 calls the tool named by the turn's metadata (the text after `<|assistant|>` on its
    line) with a body like
        ```python
        tool_call(location="beijing", unit="celsius")
        ```
    The published code passed that body to `eval`. Here it is parsed and never run: the body must
    be one call of the plain name `tool_call` with keyword arguments only, each value a Python
    literal read by `ast.literal_eval` that JSON can hold (strings, finite numbers, True/False/None,
    lists, tuples, dicts with string keys). Anything else (another function, a name, attribute
    access, an operator, a nested call, positional or `**` arguments, a body over `max_chars`
    characters, nesting the parser refuses, a tool name spanning lines) is not a tool call, and the
    content comes back as the text it is.
    """
    name = metadata.strip() if isinstance(metadata, str) else ""
    if not isinstance(content, str) or not name or "\n" in name or len(content) > max_chars:
        return content
    code = content.strip()
    fenced = TOOL_CALL_FENCE.match(code)
    if fenced:
        code = fenced.group("code").strip()
    try:
        call = ast.parse(code, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return content
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "tool_call"
        and not call.args
        and all(keyword.arg is not None for keyword in call.keywords)
    ):
        return content
    parameters = {}
    for keyword in call.keywords:
        try:
            value = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return content
        if keyword.arg in parameters or not _json_value(value):
            return content
        parameters[keyword.arg] = value
    return {"name": name, "parameters": parameters}


def _json_value(value):
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _json_value(item) for key, item in value.items())
    return False
