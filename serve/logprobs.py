"""Log probabilities in the OpenAI response shapes, from the engine's entries.

The engine gives, per token, `(id, log probability, ((id, log probability), ...))`: the token's log
probability under the model (log-softmax of its logits, before temperature and top_p) and the
likeliest alternatives. Chat completions return them as `logprobs.content` (token, logprob, bytes,
top_logprobs); text completions as the legacy lists (tokens, token_logprobs, top_logprobs,
text_offset), with `echo` the prompt's tokens first (the first one has none: nothing precedes it),
so that a harness can score a continuation from the prompt's own log probabilities.
"""

import functools

from .engine import IncrementalText


def token_texts(tokenizer):
    """id -> (text, UTF-8 bytes) of one token: the tokenizer's `token_text`, cached."""
    return functools.lru_cache(maxsize=65536)(tokenizer.token_text)


def chat_logprobs(text_of, entries):
    """`choices[i].logprobs` of a chat completion (or of a streamed chunk) for these entries."""
    content = []
    for token, logprob, top in entries:
        text, data = text_of(token)
        alternatives = []
        for other, other_logprob in top:
            other_text, other_data = text_of(other)
            alternatives.append({"token": other_text, "logprob": other_logprob, "bytes": other_data})
        content.append({"token": text, "logprob": logprob, "bytes": data, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def completion_logprobs(text_of, entries, offsets):
    """`choices[i].logprobs` of a text completion (or of a streamed chunk) for these entries, whose
    texts start at `offsets` (a `TextOffsets`). The prompt's first token (echoed) has log
    probability None and no alternatives, as in OpenAI's answers."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, logprob, top in entries:
        tokens.append(text_of(token)[0])
        token_logprobs.append(logprob)
        top_logprobs.append(None if logprob is None else {text_of(other)[0]: value for other, value in top})
        text_offset.append(offsets.place(token))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


class TextOffsets:
    """Where each token's text starts in a text that `decode` makes of the tokens, counted from
    `start`: the characters decoded before it (constant work per token, `IncrementalText`). So
    `text[offset:]` starts where the token's text does; a token that adds no characters of its own
    (`[gMASK]` and `sop` when they are not shown, an end-of-answer token, the first bytes of a
    character) is placed where the next text starts, and a piece's word marker counts only where
    the decoded text has the space (not at the start of a text, but after a `context`: the tokens
    before it, as `IncrementalText` takes them)."""

    def __init__(self, decode, start=0, context=()):
        self.text, self.start = IncrementalText(decode, context), start

    def place(self, token):
        offset = self.start + len(self.text.text)
        self.text.add(token)
        return offset


def requested_logprobs(body):
    """The `Row` fields for the log probabilities a request asks for: chat's `logprobs` (true/false)
    with `top_logprobs` alternatives; a text completion's `logprobs` (the number of alternatives) and
    `echo` (the prompt's too). ValueError names a field asked without the one it needs."""
    if hasattr(body, "top_logprobs"):
        if body.top_logprobs and not body.logprobs:
            raise ValueError("top_logprobs: set logprobs to true to get them")
        return {"logprobs": (body.top_logprobs or 0) if body.logprobs else None, "echo_logprobs": False}
    return {"logprobs": body.logprobs, "echo_logprobs": bool(body.echo) and body.logprobs is not None}


class CompletionChoices:
    """A text completion's choices: their text (with `echo`, the prompt first) and log probabilities,
    whole (`whole`) or as streamed (`streamed`, once per event of a row, in order). Row i answers
    prompt i // n. `prompts` are the prompts' texts as echoed: a text prompt as the user wrote it,
    token ids as `tokenizer.decode` writes them (special tokens by name); `from_text[p]` tells which.

    A token's `text_offset` is where its text starts in the choice's `text` (`TextOffsets`): with
    `echo` from the prompt's start, the prompt's tokens placed in the prompt's text as decoded
    (for a text prompt without the `[gMASK] sop` it never wrote: those two are at 0; a tokenizer.model
    that normalizes nothing, as ChatGLM's, decodes to the prompt itself), the answer's after it; without
    `echo` the answer's from the prompt's end, as OpenAI's answers count."""

    def __init__(self, text_of, tokenizer, rows, prompts, from_text, n, echo):
        self.text_of, self.tokenizer, self.rows, self.prompts, self.n, self.echo = text_of, tokenizer, rows, prompts, n, echo
        self.from_text = from_text
        self.started = [False] * len(rows)
        self.answer_offsets = [TextOffsets(tokenizer.decode_reply, len(prompts[index // n]), row.text_context) for index, row in enumerate(rows)]

    def whole(self, index, text):
        row = self.rows[index]
        if self.echo:
            text = self.prompts[index // self.n] + text
        return text, None if row.logprobs is None else self._logprobs(index, row.token_logprobs, first=True)

    def streamed(self, index, text, entries):
        row = self.rows[index]
        first, self.started[index] = not self.started[index], True
        if first and self.echo:
            text = self.prompts[index // self.n] + (text or "")
        if row.logprobs is None or not (entries or (first and self.echo)):
            return text, None
        return text, self._logprobs(index, entries, first)

    def _logprobs(self, index, entries, first):
        """The lists for the row's next `entries`; with `echo`, the row's first ones follow its prompt's."""
        shown = completion_logprobs(self.text_of, entries, self.answer_offsets[index])
        if not (first and self.echo):
            return shown
        skip_special = self.from_text[index // self.n]
        offsets = TextOffsets(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip_special))
        prompt = completion_logprobs(self.text_of, self.rows[index].prompt_logprobs or [], offsets)
        return {name: prompt[name] + shown[name] for name in prompt}
