"""`chat`, `stream_chat` and `stream_generate`: ChatGLM's published chat methods, on top of transformers'
`generate`. The tokenizer renders each turn and parses the reply; here the turn is generated, and streamed
from a worker thread.
"""

import queue
import threading

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .compat_chatglm import given_cache
from .configuration_chatglm import CACHE_FIELD


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """Replace a row of scores that sampling cannot use (a NaN, a +inf, or nothing finite) by a
    distribution on token 5 (the published code's choice), so that sampling never crashes.

    A -inf that marks a banned token is left alone: the published processor replaced any row holding
    one, which turned `min_new_tokens`, `bad_words_ids` or `suppress_tokens` into a stream of token 5.
    """

    def __call__(self, input_ids, scores):
        broken = scores.isnan().any(-1) | scores.isposinf().any(-1) | ~scores.isfinite().any(-1)
        if broken.any():
            scores[broken] = 0.0
            scores[broken, 5] = 5e4
        return scores


class _TokenQueue(BaseStreamer, StoppingCriteria):
    """Carries the tokens `generate` makes in a worker thread to the caller, and the caller's "stop"
    back: as a streamer it queues each step's tokens (the prompt it is first handed is skipped); as a
    stopping criterion it ends generation once the caller has gone away."""

    DONE = object()

    def __init__(self):
        self.steps = queue.Queue()
        self.cancelled = threading.Event()
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.steps.put(value.reshape(-1, 1))
        self.prompt_seen = True

    def end(self):
        pass

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatGLMChatMixin:
    """The chat methods of `ChatGLMForConditionalGeneration` (a `GenerationMixin` model)."""

    def _check_prompt(self, prompt_length, max_length):
        if prompt_length > self.config.seq_length:
            raise ValueError(
                f"the prompt has {prompt_length} tokens, more than the model's seq_length ({self.config.seq_length}); "
                f"shorten the query or the history"
            )
        if max_length is not None and prompt_length >= max_length:
            raise ValueError(
                f"the prompt has {prompt_length} tokens, which leaves no room under max_length={max_length}; "
                f"raise max_length or shorten the history"
            )

    def _chat_generate_arguments(
        self, tokenizer, query, history, role, cache, max_length, do_sample, top_p, temperature, logits_processor, kwargs
    ):
        """`generate` arguments for one chat turn; the tokenizer renders the turn and names its stop ids.

        After a cache, `input_ids` start with pad ids standing for the cached tokens: `generate` feeds only
        what the cache does not hold, and positions continue from the attention mask.
        """
        cached_length = cache.get_seq_length() if cache is not None else 0
        continuation = cached_length > 0
        input_ids = tokenizer.build_chat_input(query, history, role=role, continuation=continuation)["input_ids"]
        input_ids = input_ids.to(self.device)
        if continuation:
            cached = input_ids.new_full((1, cached_length), tokenizer.pad_token_id)
            input_ids = torch.cat((cached, input_ids), dim=1)
        length_limit = {} if "max_new_tokens" in kwargs else {"max_length": max_length}
        self._check_prompt(input_ids.shape[1], length_limit.get("max_length"))
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        sampling = {"do_sample": True, "top_p": top_p, "temperature": temperature} if do_sample else {"do_sample": False}
        arguments = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "logits_processor": processors,
            "tokenizer": tokenizer,  # for stop_strings
            "eos_token_id": tokenizer.chat_stop_ids,
            **length_limit,
            **sampling,
            **kwargs,
        }
        if cache is not None:
            arguments[CACHE_FIELD] = cache
        return arguments

    @staticmethod
    def _reply_ids(output_ids, prompt_length, stop_ids):
        """The generated ids after the prompt, without the stop token that ended them."""
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
        reply = output_ids[prompt_length:].tolist()
        return reply[:-1] if reply and reply[-1] in stop_ids else reply

    @torch.inference_mode()
    def chat(
        self,
        tokenizer,
        query,
        history=None,
        max_length=8192,
        num_beams=1,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        logits_processor=None,
        role="user",
        **kwargs,
    ):
        """One chat turn: returns (response, history with (query, response) appended).

        Any other `generate` keyword (`max_new_tokens`, `repetition_penalty`, `stop_strings`, ...) is passed on.
        ChatGLM3 (the tokenizer's `chat_format`): `history` is a list of message dicts, `role` is the
        query's role ("observation" feeds a tool's result back), generation stops on `</s>`, `<|user|>`
        or `<|observation|>`, and the response may be a tool call `{"name", "parameters"}`.
        """
        arguments = self._chat_generate_arguments(
            tokenizer, query, history, role, None, max_length, do_sample, top_p, temperature, logits_processor, kwargs
        )
        outputs = self.generate(**arguments, num_beams=num_beams)
        reply = self._reply_ids(outputs[0], arguments["input_ids"].shape[1], arguments["eos_token_id"])
        return tokenizer.process_chat_response(tokenizer.decode_reply(reply), query, history, role=role)

    @torch.inference_mode()
    def stream_chat(
        self,
        tokenizer,
        query,
        history=None,
        past_key_values=None,
        max_length=8192,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        logits_processor=None,
        return_past_key_values=False,
        role="user",
        **kwargs,
    ):
        """Yield (response so far, history) as tokens arrive (and the cache, with `return_past_key_values`).

        With `past_key_values` from the previous turn only the new round is fed, as the same ids the whole
        prompt would have there, and positions continue after the cached tokens. Partial outputs ending
        in an incomplete character are skipped, and so are an empty first text and a text equal to the
        last one yielded (the stop token adds no text). Takes the same `generate` keywords and `role` as `chat`.
        """
        if return_past_key_values and past_key_values is None:
            past_key_values = DynamicCache()
        arguments = self._chat_generate_arguments(
            tokenizer, query, history, role, past_key_values, max_length, do_sample, top_p, temperature,
            logits_processor, kwargs,
        )
        prompt_length = arguments["input_ids"].shape[1]
        last_yielded = ("", None)
        for sequence in self.stream_generate(return_past_key_values=return_past_key_values, **arguments):
            output_ids, cache = sequence if return_past_key_values else (sequence, None)
            text = tokenizer.decode_reply(self._reply_ids(output_ids[0], prompt_length, arguments["eos_token_id"]))
            if text.endswith("\ufffd"):
                continue
            response, new_history = tokenizer.process_chat_response(text, query, history, role=role)
            if (response, new_history) == last_yielded or (response == "" and last_yielded[1] is None):
                continue
            last_yielded = (response, new_history)
            yield (response, new_history, cache) if return_past_key_values else (response, new_history)

    @torch.inference_mode()
    def stream_generate(self, input_ids, return_past_key_values=False, **kwargs):
        """Yield the input ids followed by the tokens generated so far, one step at a time (and the cache,
        with `return_past_key_values`).

        This is transformers' `generate` with a streamer, so it takes every `generate` keyword. The step
        whose stop token ended generation is not yielded: callers decode what is yielded with special
        tokens kept (FastChat), and the reply ends before its stop token. The cache handed back holds
        every yielded token, so that it can continue a conversation.
        """
        cache = given_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        if cache is None and return_past_key_values:
            cache = DynamicCache()
        if cache is not None:
            kwargs[CACHE_FIELD] = cache
        tokens = _TokenQueue()
        stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stopping.append(tokens)
        eos_ids = kwargs.get("eos_token_id", (kwargs.get("generation_config") or self.generation_config).eos_token_id)
        eos_ids = set([eos_ids] if isinstance(eos_ids, int) else (eos_ids or []))

        def run():
            try:
                sequences = self.generate(input_ids, streamer=tokens, stopping_criteria=stopping, **kwargs)
                last = sequences[:, -1:]
                if cache is not None and not tokens.cancelled.is_set() and not set(last.flatten().tolist()) <= eos_ids:
                    # Stopped by length or a stop string: feed the last token so the cache covers all yielded.
                    given = kwargs.get("attention_mask")
                    mask = torch.ones_like(sequences)
                    if given is not None:
                        mask[:, : given.shape[1]] = given
                    with torch.no_grad():
                        self(input_ids=last, attention_mask=mask, position_ids=None, use_cache=True, **{CACHE_FIELD: cache})
            except BaseException as error:  # handed to the caller's thread
                tokens.steps.put(error)
            tokens.steps.put(_TokenQueue.DONE)

        worker = threading.Thread(target=run, name="chatglm-generate", daemon=True)
        worker.start()
        sequence, held = input_ids, None
        stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        try:
            while (step := tokens.steps.get()) is not _TokenQueue.DONE:
                if isinstance(step, BaseException):
                    raise step
                if held is not None:  # generation went on after every row had a stop token
                    yield held
                    held = None
                sequence = torch.cat((sequence, step.to(sequence.device)), dim=-1)
                stopped |= torch.tensor([token in eos_ids for token in step.flatten().tolist()])
                output = (sequence, cache) if return_past_key_values else sequence
                if stopped.all():
                    held = output  # the last step, unless more come
                else:
                    yield output
        finally:
            tokens.cancelled.set()
            worker.join()
