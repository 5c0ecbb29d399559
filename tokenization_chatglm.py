"""Tokenizer of ChatGLM2-6B and ChatGLM3-6B: a SentencePiece model plus the GLM special tokens.

The ids it produces are the ones the released weights were trained on: text is encoded by
SentencePiece alone, and `[gMASK] sop` goes in front of every encoded text. Padding is on the
left unless asked otherwise, and every encoding carries the `position_ids` the model's rotary
embedding reads.
ChatGLM3 uses the same `tokenizer.model` with four role tokens after the five GLM ones, and its own
chat format (`chat_format="chatglm3"`).
"""

import copy
import inspect
import json
import os
import re
import shutil

import sentencepiece
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

VOCAB_FILE_NAME = "tokenizer.model"
# The piece SentencePiece puts in front of a text (its "dummy prefix"), a lone word boundary.
SENTENCEPIECE_SPACE = "\u2581"

# --- transformers 4.57 / 5.x differences ---
# Here, and in ChatGLMTokenizer.from_pretrained (4.x hides the constructor's error behind an ImportError).
# What apply_chat_template(tokenize=True) returns unless told: the ids on 4.x, the encoding on 5.x.
CHAT_RETURNS_DICT_BY_DEFAULT = inspect.signature(PreTrainedTokenizer.apply_chat_template).parameters[
    "return_dict"
].default

# Ids n_pieces .. n_pieces + 4, in this order (spec §4).
GLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

# ChatGLM3's roles; their tokens follow the GLM special tokens (ids n_pieces + 5 .. n_pieces + 8).
CHATGLM3_ROLES = ("system", "user", "assistant", "observation")
CHATGLM3_ROLE_TOKENS = tuple(f"<|{role}|>" for role in CHATGLM3_ROLES)
CHAT_FORMATS = ("chatglm2", "chatglm3")
# The system prompt ChatGLM3's tool demos put before the tool list (THUDM/ChatGLM3 PROMPT_en.md).
CHATGLM3_TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


def _special_tokens_in_text(names):
    """What `encode_special_tokens=True` recognises in text: the bracketed and role names, and "sop"
    only right after "[gMASK]" ("sop" and "eop" also occur inside ordinary words: "isopropyl")."""
    literal = [re.escape(name) for name in names if name not in ("sop", "eop")]
    return re.compile("(" + "|".join(literal + [r"(?<=\[gMASK\])sop"]) + ")")

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

# The ids every prompt starts with, `[gMASK]` `sop`, as text: a tokenizer with
# `encode_special_tokens=True` turns it into those two ids.
PROMPT_PREFIX_TEXT = "[gMASK]sop"

# CHAT_TEMPLATE for serving folders (tools/upgrade_checkpoint.py --for-serving), whose engines
# (vLLM, SGLang) tokenize the rendered text as one string without adding special tokens, with
# `encode_special_tokens=True`: the same text after the prefix, which ordinary folders add as ids.
SERVING_CHAT_TEMPLATE = "{{- " + _jinja_string(PROMPT_PREFIX_TEXT) + " -}}\n" + CHAT_TEMPLATE


# The ChatGLM3 format as a Jinja template, for front ends that render `tokenizer_config.json`'s
# template and tokenize the text with `encode_special_tokens=True` (serving engines): the text is
# `[gMASK]sop`, then per message `<|role|>{metadata}\n {content}`, then `<|assistant|>`, which
# tokenizes to `build_chat_input`'s ids (the space stands for SentencePiece's dummy prefix of the
# separately encoded content). Tools, from the `tools` argument or a system message's "tools", are
# appended to the system content as indented JSON, as the release renders them.
CHATGLM3_CHAT_TEMPLATE = (
    r"""{%- set ns = namespace(messages=messages, tools=[]) -%}
{%- if tools -%}
    {%- for tool in tools -%}
        {%- set ns.tools = ns.tools + [tool['function'] if tool['type'] == 'function' and tool['function'] is defined else tool] -%}
    {%- endfor -%}
    {%- if messages and messages[0]['role'] == 'system' -%}
        {%- set ns.messages = [{'role': 'system', 'content': messages[0]['content'], 'tools': ns.tools}] + messages[1:] -%}
    {%- else -%}
        {%- set ns.messages = [{'role': 'system', 'content': TOOLS_PROMPT, 'tools': ns.tools}] + messages -%}
    {%- endif -%}
{%- endif -%}
{{- PROMPT_PREFIX -}}
{%- for message in ns.messages -%}
    {%- set where = 'ChatGLM3 chat template: messages[' ~ loop.index0 ~ ']' -%}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}
        {{- raise_exception(where ~ ' has unknown role "' ~ message['role'] ~ '"'
            ~ ' (expected system, user, assistant or observation)') -}}
    {%- endif -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception(where ~ ' (role "' ~ message['role'] ~ '") needs a string "content"') -}}
    {%- endif -%}
    {%- set content = message['content'] -%}
    {%- if message['role'] == 'system' and message['tools'] is defined and message['tools'] is not none -%}
        {%- set content = content ~ '\n' ~ (message['tools'] | tojson(indent=4)) -%}
    {%- endif -%}
    {{- '<|' ~ message['role'] ~ '|>' ~ (message['metadata'] if message['metadata'] is defined and message['metadata'] else '') ~ '\n' -}}
    {%- if content -%}
        {{- ' ' ~ content -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}"""
    .replace("TOOLS_PROMPT", _jinja_string(CHATGLM3_TOOLS_PROMPT))
    .replace("PROMPT_PREFIX", _jinja_string(PROMPT_PREFIX_TEXT))
)


def _json_object(path):
    """The JSON object in `path`, or {} when the file is missing, unreadable or holds no object."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def chat_format_of_folder(folder):
    """The chat format of a model folder, read from its config and tokenizer files, never its code:
    the `chat_format` that tokenizer_config.json or config.json states (a folder this package wrote),
    else "chatglm3" when config.json's `_name_or_path` names a ChatGLM3 release ("THUDM/chatglm3-6b")
    or tokenizer_config.json adds ChatGLM3's role tokens or has a chat template that writes them (the
    release's), else "chatglm2". The two releases ship the same tokenizer.model, so the vocabulary
    cannot tell them apart."""
    config = _json_object(os.path.join(folder, "config.json"))
    tokenizer_config = _json_object(os.path.join(folder, "tokenizer_config.json"))
    for stated in (tokenizer_config.get("chat_format"), config.get("chat_format")):
        if stated in CHAT_FORMATS:
            return stated
    name = re.split(r"[\\/]", str(config.get("_name_or_path") or "").rstrip("/\\"))[-1]
    if name.lower().startswith("chatglm3"):
        return "chatglm3"
    added = tokenizer_config.get("added_tokens_decoder")
    added = [token.get("content") for token in added.values() if isinstance(token, dict)] if isinstance(added, dict) else []
    extra = tokenizer_config.get("additional_special_tokens")
    added += extra if isinstance(extra, list) else []
    template = tokenizer_config.get("chat_template")
    template = template if isinstance(template, str) else ""
    if any(token in CHATGLM3_ROLE_TOKENS for token in added) or any(token in template for token in CHATGLM3_ROLE_TOKENS):
        return "chatglm3"
    return "chatglm2"


def _tool_schemas(tools):
    """ChatGLM3's tool list: JSON-schema dicts as given, `{"type": "function", "function": f}` as `f`,
    Python functions through transformers' `get_json_schema` (as `apply_chat_template` does)."""
    from transformers.utils import get_json_schema

    schemas = []
    for tool in tools:
        if callable(tool) and not isinstance(tool, dict):
            tool = get_json_schema(tool)
        if not isinstance(tool, dict):
            raise TypeError(f"a tool must be a dict (JSON schema) or a Python function, got {type(tool).__name__}")
        if tool.get("type") == "function" and "function" in tool:
            tool = tool["function"]
        schemas.append(tool)
    return schemas


def _chatglm3_fields(message, where):
    """(role, content, metadata) of a ChatGLM3 message dict, or ValueError naming `where`."""
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be a dict with 'role' and 'content', got {message!r}")
    role, content, metadata = message.get("role"), message.get("content"), message.get("metadata") or ""
    if role not in CHATGLM3_ROLES:
        raise ValueError(f"{where} has role {role!r}; ChatGLM3 roles are {', '.join(CHATGLM3_ROLES)}")
    if not isinstance(content, str) or not isinstance(metadata, str):
        raise ValueError(f"{where} (role {role!r}) needs a string 'content' and, if any, a string 'metadata'")
    return role, content, metadata


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


def _position_ids(attention_mask, length):
    """0, 1, 2, ... over the real tokens; 0 at padding (either side)."""
    if attention_mask is None:
        return list(range(length))
    positions, seen = [], 0
    for is_real in attention_mask:
        positions.append(seen if is_real else 0)
        seen += 1 if is_real else 0
    return positions


class SPTokenizer:
    """`tokenizer.tokenizer`: the SentencePiece layer under the published ChatGLM tokenizers, with the
    attributes tools read from it (llama.cpp's convert_hf_to_gguf.py reads `sp_model`). A view of the
    ChatGLMTokenizer that owns it: every answer comes from that tokenizer's own methods."""

    def __init__(self, owner):
        self._owner = owner

    @property
    def sp_model(self):
        return self._owner.sp_model

    @property
    def n_words(self):
        """Pieces plus the GLM (and ChatGLM3 role) special tokens."""
        return self._owner.vocab_size

    @property
    def bos_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_id(self):
        return self.sp_model.eos_id()

    @property
    def pad_id(self):
        return self.sp_model.unk_id()

    @property
    def special_tokens(self):
        return self._owner.special_token_ids

    @property
    def index_special_tokens(self):
        """`special_tokens` inverted, `{id: name}` (ChatGLM3's fine-tuning demo prints tokens with it)."""
        return {index: name for name, index in self.special_tokens.items()}

    def tokenize(self, s):
        """SentencePiece's pieces of `s`; special token names in it stay text."""
        return self._owner._tokenize(s, special=False)

    def encode(self, s, bos=False, eos=False):
        """SentencePiece's ids of `s`, with `<s>` in front and `</s>` after when asked."""
        ids = self._owner._text_ids(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """Text of `ids`, special tokens written as their names."""
        return self._owner.decode(ids, skip_special_tokens=False)

    def convert_token_to_id(self, token):
        return self._owner._convert_token_to_id(token)

    def convert_id_to_token(self, index):
        return self._owner._convert_id_to_token(index)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM2-6B / ChatGLM3-6B tokenizer (slow, SentencePiece).

    Ids: the SentencePiece pieces (`<unk>`=0, `<s>`=1, `</s>`=2 in the release), then `[MASK]`,
    `[gMASK]`, `[sMASK]`, `sop`, `eop`, and with `chat_format="chatglm3"` `<|system|>`, `<|user|>`,
    `<|assistant|>`, `<|observation|>` (64794..64797 in the release). `vocab_size` and `len()`
    count them all. pad = unk, eos = `</s>`.

    `chat_format` ("chatglm2" or "chatglm3", saved in tokenizer_config.json) picks the dialect.
    Both releases ship the same tokenizer.model, so it cannot come from the vocabulary: unset, it is
    "chatglm3" when the config.json beside tokenizer.model names a ChatGLM3 release in its
    `_name_or_path`, else "chatglm2". The dialect decides the role tokens, `build_chat_input`,
    `process_chat_response`, the chat template and `chat_stop_ids`.

    Encoding: text becomes exactly the ids `SentencePieceProcessor.encode` gives; the literal text
    "</s>", "[gMASK]" or "<|user|>" in user input stays text, so a user cannot forge a turn.
    `[gMASK] sop` is put in front; a pair becomes `[gMASK] sop A B </s>`. With
    `encode_special_tokens=True` (for callers that tokenize a whole rendered prompt), the bracketed
    names `[MASK]`, `[gMASK]`, `[sMASK]`, the role names, and "sop" right after "[gMASK]" written in
    text become their special ids; "eop" and any other "sop" never do. The chat entry points
    (`build_chat_input`, `apply_chat_template(tokenize=True)`, the model's `chat`) insert control ids
    themselves and never match strings.

    Piece names: BPE models keep intermediate merges, so "sop" or "eop" can also be an ordinary
    piece. The piece wins: `convert_tokens_to_ids` and `get_vocab` then give the piece's id, which
    keeps tokenize-then-convert equal to SentencePiece. `get_command(name)` always gives the special
    token's id.

    Decoding follows transformers: `decode(ids)` (`skip_special_tokens=False`) writes special tokens
    as their names (`<unk>` for pad, `<s>`, `</s>`, `[gMASK]`, `sop`, ChatGLM3's `<|user|>`, ...),
    `skip_special_tokens=True` drops them. `decode_reply` is what chat and the server read: the GLM
    special tokens, `<s>`, `</s>` and pad dropped, ChatGLM3's role tokens kept as their names (a reply
    can hold several `<|assistant|>` segments). Ids that are no token of this tokenizer (negative, such
    as -100 labels, or `>= len(tokenizer)`, such as the model's padded rows 64798..65023) decode to
    nothing, and convert to the token `""`, as in the published code.

    `tokenizer.tokenizer` is the published `SPTokenizer` surface (`sp_model`, `n_words`, `special_tokens`,
    `encode`, ...), which tools such as llama.cpp's GGUF converter read.

    Padding is on the left by default, where generation needs it; `padding_side="right"` (at load,
    as the attribute, or per call) pads on the right, for training. `position_ids` count the real
    tokens from 0 either way.
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
        chat_format=None,
        **kwargs,
    ):
        # transformers asks for the vocabulary inside its constructor, so the model comes first.
        self.vocab_file = vocab_file
        self.sp_model = _load_sentencepiece(vocab_file, kwargs.get("name_or_path"))
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.encode_special_tokens = encode_special_tokens
        if chat_format is None:
            chat_format = chat_format_of_folder(os.path.dirname(vocab_file))
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"ChatGLMTokenizer: chat_format must be 'chatglm2' or 'chatglm3', got {chat_format!r}")
        self.chat_format = chat_format
        self.special_token_names = GLM_SPECIAL_TOKENS + (CHATGLM3_ROLE_TOKENS if chat_format == "chatglm3" else ())
        self._special_text_pattern = _special_tokens_in_text(self.special_token_names)
        unk_piece = self.sp_model.id_to_piece(self.sp_model.unk_id())
        kwargs.setdefault("unk_token", unk_piece)
        kwargs.setdefault("pad_token", unk_piece)
        kwargs.setdefault("eos_token", self.sp_model.id_to_piece(self.sp_model.eos_id()))
        # Folders that carry the released tokenizer_config.json have no template of their own; this
        # package's tokenizer_config.json, copied beside ChatGLM3 weights, carries ChatGLM2's.
        if chat_format == "chatglm3" and kwargs.get("chat_template") in (None, CHAT_TEMPLATE):
            kwargs["chat_template"] = CHATGLM3_CHAT_TEMPLATE
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            remove_space=remove_space,
            do_lower_case=do_lower_case,
            encode_special_tokens=encode_special_tokens,
            chat_format=chat_format,
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
    def tokenizer(self):
        """The published `SPTokenizer` surface, see SPTokenizer."""
        return SPTokenizer(self)

    @property
    def num_pieces(self):
        """Pieces in the SentencePiece model; the special tokens' ids start here."""
        return self.sp_model.get_piece_size()

    @property
    def special_token_ids(self):
        """`{name: id}` of `[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop` (and ChatGLM3's role tokens)."""
        return {name: self.num_pieces + offset for offset, name in enumerate(self.special_token_names)}

    @property
    def role_token_ids(self):
        """ChatGLM3's role token ids (empty for ChatGLM2)."""
        return {index for name, index in self.special_token_ids.items() if name in CHATGLM3_ROLE_TOKENS}

    @property
    def vocab_size(self):
        return self.num_pieces + len(self.special_token_names)

    @property
    def chat_stop_ids(self):
        """Ids that end a chat reply: `</s>`, and for ChatGLM3 `<|user|>` and `<|observation|>` (the
        model hands the turn back to the user or asks for a tool's result)."""
        stops = [self.sp_model.eos_id()]
        if self.chat_format == "chatglm3":
            stops += [self.get_command("<|user|>"), self.get_command("<|observation|>")]
        return stops

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
        shadowed = [name for name in self.special_token_names if self._convert_token_to_id(name) < self.num_pieces]
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

    def _tokenize(self, text, dummy_prefix=True, special=None, **kwargs):
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
        if not (self.encode_special_tokens if special is None else special):
            chunks = [(text, False)]
        else:
            # re.split puts the matches at the odd indices; a text chunk spelled "sop" stays text.
            parts = self._special_text_pattern.split(text)
            chunks = [(part, index % 2 == 1) for index, part in enumerate(parts) if part]
        tokens = []
        for chunk, is_special in chunks:
            if is_special:
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
        # Ids that are no token (the model's padded rows, -100 labels) are "", as the published
        # code has them: llama.cpp's converter marks "" unused, any other text as a token of its own.
        if 0 <= index < self.num_pieces:
            return self.sp_model.id_to_piece(index)
        if self.num_pieces <= index < self.vocab_size:
            return self.special_token_names[index - self.num_pieces]
        return ""

    def _text_ids(self, text):
        """SentencePiece's ids of `text`, special token names in it left as text."""
        return self.convert_tokens_to_ids(self._tokenize(text, special=False))

    def _special_ids(self):
        """Ids that are special tokens: pad/unk, `<s>`, `</s>`, the GLM ones and ChatGLM3's roles."""
        pieces = {self.sp_model.unk_id(), self.sp_model.bos_id(), self.sp_model.eos_id()}
        return pieces | set(self.special_token_ids.values())

    def _text_of_ids(self, ids, shown, skip_added_special=False):
        """Text of `ids`: runs of pieces go through SentencePiece (which joins byte-fallback pieces
        into characters), special ids in `shown` are written as their names and the other special
        ids dropped, added tokens are copied (special ones not with `skip_added_special`), ids that
        are no token are dropped."""
        special, roles = self._special_ids(), self.role_token_ids
        parts, run = [], []
        for index in ids:
            if index in shown or index in roles:
                # The text after a special token or a turn starts a new SentencePiece text, as it was encoded.
                parts.append(self.sp_model.decode(run))
                run = []
                if index in shown:
                    parts.append(self._convert_id_to_token(index))
            elif index in special:
                continue
            elif 0 <= index < self.num_pieces:
                run.append(index)
            elif index in self._added_tokens_decoder:
                token = self._added_tokens_decoder[index]
                parts.append(self.sp_model.decode(run))
                run = []
                if not (skip_added_special and token.special):
                    parts.append(token.content)
        parts.append(self.sp_model.decode(run))
        return "".join(parts)

    def decode_reply(self, token_ids):
        """Text of generated ids as chat, stream_chat and the server read it: pad, `<s>`, `</s>` and the
        GLM special tokens dropped, ChatGLM3's role tokens kept (`process_chat_response` splits there)."""
        return self._text_of_ids([int(index) for index in token_ids], shown=self.role_token_ids)

    def convert_tokens_to_string(self, tokens):
        # "" is the token of ids that are no token (`_convert_id_to_token`); decode drops them, so does this.
        ids = self.convert_tokens_to_ids([token for token in tokens if token != ""])
        return self._text_of_ids(ids, shown=self._special_ids())

    def token_text(self, index):
        """(text, UTF-8 bytes) of one token as it stands inside a text, for views of single tokens (a
        server's log probabilities): a piece with its word marker as a space (decoding it alone drops
        it), a byte-fallback piece (part of a character) by its name `<0xE4>` with that one byte, a
        special or added token by its name; an id that is no token is ("", [])."""
        token = self.convert_ids_to_tokens(index)
        if 0 <= index < self.num_pieces and self.sp_model.is_byte(index):
            return token, [int(token[3:-1], 16)]
        text = token.replace(SENTENCEPIECE_SPACE, " ")
        return text, list(text.encode("utf-8"))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else [int(index) for index in token_ids]
        shown = set() if skip_special_tokens else self._special_ids()
        text = self._text_of_ids(ids, shown, skip_added_special=skip_special_tokens)
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
            special = self._special_ids()
            return [1 if index in special else 0 for index in token_ids_0]
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
        """Pad one encoding (on `padding_side`, else the tokenizer's) and give it `position_ids`.

        Positions not passed in are counted from the attention mask, so an encoding that is
        already padded still numbers its real tokens from 0.
        """
        padding_side = padding_side or self.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"ChatGLMTokenizer: padding_side must be 'left' or 'right', got {padding_side!r}")
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
                padding = [pad_value] * missing
                values = list(encoded_inputs[key])
                encoded_inputs[key] = padding + values if padding_side == "left" else values + padding
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
        history = self._chat_history(history)
        prompt = ""
        for number, (old_query, response) in enumerate(history, start=1):
            prompt += ROUND_OPENING.format(number=number) + old_query + ANSWER_OPENING + response + TURN_END
        return prompt + ROUND_OPENING.format(number=len(history) + 1) + query + ANSWER_OPENING

    def get_prefix_tokens(self):
        """The ids every prompt starts with: `[gMASK]`, `sop`."""
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_chat_input(self, query, history=None, role="user", continuation=False):
        """Ids of one chat turn as a batch of one (`input_ids`, `attention_mask`, `position_ids`, tensors).

        Without `continuation`: the whole prompt, `[gMASK] sop` + `build_prompt(query, history)`.
        With `continuation=True`: only what follows a cache that holds the conversation so far (the
        earlier prompt and the answer ids), i.e. the tail of the whole prompt's ids from the blank line
        that ends the last answer: `"\n\n[Round n]\n\n问：{query}\n\n答："`, without the prefix and
        without SentencePiece's dummy-prefix piece, which the whole prompt never has there. Its
        `position_ids` count from 0; after a cache, positions continue from the cache's length (`chat`
        derives them from an attention mask that covers the cache). ChatGLM2 has one role, "user".

        ChatGLM3 (`chat_format="chatglm3"`): `history` is a list of `{"role", "content"[, "metadata"]
        [, "tools"]}` dicts and `role` one of system, user, assistant, observation. The prompt is
        `[gMASK] sop`, each message as `<|role|>` + ids of `f"{metadata}\n"` + ids of the content (a
        system message's `tools` appended to its content as `"\n" + json.dumps(tools, indent=4,
        ensure_ascii=False)`), then `<|role|>` + ids of `"\n"` + ids of `query`, then `<|assistant|>`:
        the released `build_chat_input`'s ids. With `continuation=True` the prefix and history are left
        out (they are in the cache). Role tokens are inserted as ids: text never becomes one.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if self.chat_format == "chatglm3":
            messages = self._chatglm3_history(history)
            turn = self._chatglm3_message_ids({"role": role, "content": query}, "the query")
            turn.append(self.get_command("<|assistant|>"))
            if not continuation or not messages:
                turn = self._chatglm3_conversation_ids(messages) + turn
            return self.pad({"input_ids": [turn]}, return_tensors="pt")
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

        ChatGLM3: `response` is the decoded reply after `<|assistant|>` (its stop token removed). The
        history gains `{"role": role, "content": query}` and one assistant message per
        `<|assistant|>` segment, `{"role": "assistant", "metadata": first line, "content": the rest}`.
        The returned response is the last segment's: text when its metadata is empty; a tool call
        `{"name", "parameters"}` read by `parse_tool_call` (never executed) when the conversation's
        system message has tools, or the text itself when that is no literal `tool_call(...)`;
        otherwise `{"name": metadata, "content": text}` (the code interpreter).
        """
        if self.chat_format != "chatglm3":
            response = response.strip().replace("[[训练时间]]", "2023年")
            return response, self._chat_history(history) + [(query, response)]
        if role not in CHATGLM3_ROLES:
            raise ValueError(f"ChatGLM3 roles are {', '.join(CHATGLM3_ROLES)}; got role={role!r}")
        history = copy.deepcopy(self._chatglm3_history(history)) + [{"role": role, "content": query}]
        tools = history[0].get("tools") if history[0]["role"] == "system" else None
        content = ""
        for segment in response.split("<|assistant|>"):
            metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
            if not metadata.strip():
                content = content.strip()
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                content = content.replace("[[训练时间]]", "2023年")
                continue
            # The space is SentencePiece's word marker on the line's first piece; kept, the history
            # would render ids the model did not produce.
            content = content[1:] if content.startswith(" ") else content
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            if tools:
                content = parse_tool_call(metadata, content)
            else:
                content = {"name": metadata.strip(), "content": content}
        return content, history

    def _chatglm3_history(self, history):
        """`history` as a list of ChatGLM3 message dicts, or ValueError/TypeError naming the entry."""
        if history is None:
            return []
        if not isinstance(history, (list, tuple)):
            raise TypeError(f"history must be a list of message dicts, got {type(history).__name__}")
        for index, message in enumerate(history):
            _chatglm3_fields(message, f"history[{index}]")
        return list(history)

    def _chatglm3_message_ids(self, message, where):
        """`<|role|>` + ids of `f"{metadata}\n"` + ids of the content (and a system message's tools)."""
        role, content, metadata = _chatglm3_fields(message, where)
        if role == "system" and message.get("tools") is not None:
            content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids = [self.get_command(f"<|{role}|>")]
        for text in (metadata + "\n", content):
            ids += self._text_ids(text)
        return ids

    def build_single_message(self, role, metadata, message):
        """Ids of one ChatGLM3 message as the published tokenizer built them: `<|role|>`, then the ids of
        `f"{metadata}\n"`, then the ids of `message`."""
        if self.chat_format != "chatglm3":
            raise ValueError("build_single_message is ChatGLM3's; this tokenizer has chat_format='chatglm2'")
        return self._chatglm3_message_ids({"role": role, "metadata": metadata, "content": message}, "the message")

    def _chatglm3_conversation_ids(self, messages):
        ids = self.get_prefix_tokens()
        for index, message in enumerate(messages):
            ids += self._chatglm3_message_ids(message, f"messages[{index}]")
        return ids

    @staticmethod
    def _chatglm3_messages(conversation, tools):
        """The conversation with `tools` placed in its system message (one is added if there is none)."""
        messages = list(conversation)
        if not tools:
            return messages
        tools = _tool_schemas(tools)
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            return [{"role": "system", "content": messages[0].get("content"), "tools": tools}] + messages[1:]
        return [{"role": "system", "content": CHATGLM3_TOOLS_PROMPT, "tools": tools}] + messages

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

        ChatGLM3: messages take the roles system, user, assistant, observation, in any order, with
        optional `metadata` (an assistant's tool name) and, on a system message, `tools`. `tools=`
        goes into the first system message (one with ChatGLM3's tool prompt is added if there is
        none); `{"type": "function", "function": f}` entries are rendered as `f`, as ChatGLM3 was
        trained. With `tokenize=True` and no `chat_template` argument, the ids are built as
        `build_chat_input` builds them (`<|assistant|>` last with `add_generation_prompt=True`),
        never by matching the rendered text; the built-in template's text, tokenized with
        `encode_special_tokens=True`, gives the same ids.

        With `encode_special_tokens=True` (serving folders), a rendered text that begins with
        `[gMASK]sop` (SERVING_CHAT_TEMPLATE's) is tokenized without adding the prefix again.
        """
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("apply_chat_template needs at least one message, got an empty conversation")
        if self.chat_format == "chatglm3" and tokenize and chat_template is None and not documents:
            if not isinstance(conversation, (list, tuple)) or not conversation or not isinstance(conversation[0], dict):
                raise ValueError("ChatGLM3 apply_chat_template takes one conversation: a list of message dicts")
            ids = self._chatglm3_conversation_ids(self._chatglm3_messages(conversation, tools))
            if add_generation_prompt:
                ids.append(self.get_command("<|assistant|>"))
            encoding = self.prepare_for_model(
                ids,
                add_special_tokens=False,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
                prepend_batch_axis=return_tensors is not None,
                **(tokenizer_kwargs or {}),
            )
            if return_dict is None:
                return_dict = CHAT_RETURNS_DICT_BY_DEFAULT
            return encoding if return_dict else encoding["input_ids"]
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
        # A template that emits the prefix itself (SERVING_CHAT_TEMPLATE) gets it once, not twice.
        prefixed = self.encode_special_tokens and text.startswith(PROMPT_PREFIX_TEXT)
        encoding = self(
            text,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **{"add_special_tokens": not prefixed, **(tokenizer_kwargs or {})},
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
