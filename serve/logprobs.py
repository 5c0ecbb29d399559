"""Log probabilities in the OpenAI response shapes, from the engine's entries.

The engine gives, per token, `(id, log probability, ((id, log probability), ...))`: the token's log
probability under the model (log-softmax of its logits, before temperature and top_p) and the
likeliest alternatives. Chat completions return them as `logprobs.content` (token, logprob, bytes,
top_logprobs); text completions as the legacy lists (tokens, token_logprobs, top_logprobs,
text_offset), with `echo` the prompt's tokens first (the first one has none: nothing precedes it),
so that a harness can score a continuation from the prompt's own log probabilities.
"""

import functools


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


def completion_logprobs(text_of, entries, offset):
    """`choices[i].logprobs` of a text completion (or of a streamed chunk) for these entries, the
    first token's text starting at character `offset`. The prompt's first token (echoed) has log
    probability None and no alternatives, as in OpenAI's answers."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        token, logprob, top = entry
        text = text_of(token)[0]
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append(None if logprob is None else {text_of(other)[0]: value for other, value in top})
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


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
    prompt i // n. A token's text offset counts the characters of the token texts before it, from
    the prompt's start with `echo`, else from its end (as OpenAI's answers do)."""

    def __init__(self, text_of, rows, prompts, n, echo):
        self.text_of, self.rows, self.prompts, self.n, self.echo = text_of, rows, prompts, n, echo
        self.offsets = [0 if echo else len(prompts[index // n]) for index in range(len(rows))]
        self.started = [False] * len(rows)

    def whole(self, index, text):
        row, prompt = self.rows[index], self.prompts[index // self.n]
        entries = row.token_logprobs
        if self.echo:
            text = prompt + text
            entries = (row.prompt_logprobs or []) + entries
        if row.logprobs is None:
            return text, None
        return text, completion_logprobs(self.text_of, entries, self.offsets[index])

    def streamed(self, index, text, entries):
        row = self.rows[index]
        if not self.started[index]:
            self.started[index] = True
            if self.echo:
                text = self.prompts[index // self.n] + (text or "")
                entries = (row.prompt_logprobs or []) + list(entries)
        if row.logprobs is None or not entries:
            return text, None
        logprobs = completion_logprobs(self.text_of, entries, self.offsets[index])
        self.offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return text, logprobs
