"""The serving engine: one worker thread owns the model and advances every running request together,
one step at a time (continuous batching).

Requests are queued as jobs. Each job holds one or more rows (a row is one sequence to generate: one
choice of one prompt). Every step of the worker

1. admits waiting jobs, first come first served, while their rows fit in `max_batch_size` (rows
   being prefilled and rows being decoded count alike);
2. prefills: feeds the next chunk of the prompts being read (`prefill_plan`: the prompt with the
   fewest tokens left first, but one passed over for `prefill_patience` steps in a row before the
   others, so that a stream of short prompts cannot starve a long one), until the step has fed
   `prefill_chunk` tokens (always at least one chunk). A prompt is read
   alone, into its own KV cache, in chunks of `prefill_chunk` tokens counted from its start, so
   what it computes does not depend on what else runs. Its last chunk's logits give each of its rows
   a first token, and the rows join the decoding batch (the `n` choices of a prompt share one
   prefill: its cache is copied per row);
3. decodes one token for every decoding row in one forward over a left-padded batch KV cache: a
   row that joins is padded to the batch's length (or the batch to its), a row that ended is
   removed, and the padding every row has is cut off. The model derives each row's positions
   from the padding mask.

So a request starts at the next step instead of waiting for the batch before it, and a running
row's time per token grows by at most one prefill chunk while a newcomer's prompt is read.

Each row is sampled with its own temperature, top_p and seeded `torch.Generator` (the same seed
gives the same answer whatever else shares the batch), decoded incrementally (`IncrementalText`:
constant work per token), and ends at an end-of-answer token, a stop string, its `max_tokens`, or
when its client went away. The text sent to a client holds back an incomplete character, the start
of a stop string and an unclosed placeholder of the chat post-processing. With `logprobs`, every
generated token (and with `echo_logprobs` every prompt token after the first) gets its log
probability under the model (log-softmax of its logits, before temperature, top_p and min_tokens)
and the `logprobs` likeliest alternatives.

Transformers' own continuous batching (`generate_batch`, paged attention) does not run this model
(see serve/README.md), hence this scheduler. The queue is bounded: `submit` raises `Busy` past
`max_waiting` waiting jobs, and the server answers 429 with Retry-After. At shutdown the waiting
jobs are answered at once (`refuse_waiting`: 503), the running ones when the worker stops.
"""

import bisect
import collections
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

log = logging.getLogger("serve.engine")


class Busy(Exception):
    """The waiting queue is full."""


class ShuttingDown(Exception):
    """The engine takes no more jobs: the server is shutting down."""


SHUTDOWN_WAITING = "the server is shutting down; this request was not started, send it again later"
SHUTDOWN_RUNNING = "the server shut down before this answer was finished"


@dataclass
class Row:
    """One sequence to generate."""

    prompt_ids: list
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int
    stop: tuple = ()
    min_tokens: int = 0  # eos is not sampled before this many tokens
    logprobs: Optional[int] = None  # None: no log probabilities; k: each token's and the k likeliest
    echo_logprobs: bool = False  # also the prompt's tokens' (`prompt_logprobs`)
    continues_prompt: bool = False  # the text is what the tokens add to the prompt's (`text_context`)
    tokens: list = field(default_factory=list)  # generated ids, eos excluded
    sent: str = ""  # text already sent to the client
    finish_reason: str = None  # "stop", "length", or "cancelled"
    generated: int = 0  # tokens generated, eos included
    # Per generated token, eos included, with `logprobs`: (id, log probability, ((id, log probability), ...)).
    token_logprobs: list = field(default_factory=list)
    # With `echo_logprobs`, an entry per prompt token; the first has log probability None (nothing precedes it).
    prompt_logprobs: list = None

    @property
    def done(self):
        return self.finish_reason is not None

    @property
    def text_context(self):
        """The prompt tokens the row's text is decoded after (their own text not part of it): a text
        completion's first token keeps its word marker (" I" after "你好！"); a chat reply, which
        starts after the format's newline, is decoded alone."""
        return self.prompt_ids[-1:] if self.continues_prompt else []


class Job:
    """A request's rows and the channel back to it. `events` receives, from the worker thread:
    ("delta", row_index, text, logprob_entries), ("finish", row_index, finish_reason,
    text_of_the_whole_row, logprob_entries), ("done",) once every row has finished, or ("error",
    message, HTTP status, error code or None): 500 when a step failed, 503 at shutdown.
    `logprob_entries` are the row's `token_logprobs` not sent with an earlier event (empty without
    `logprobs`). `answer_start(text)` is where stop strings are looked for in a row's
    text (None: not yet), for replies that open with a line of the format's own (ChatGLM3's metadata)."""

    def __init__(self, rows, loop, events, postprocess=None, kind="generate", answer_start=None):
        self.rows = rows
        self.loop = loop
        self.events = events
        self.postprocess = postprocess
        self.answer_start = answer_start
        self.kind = kind
        self.cancelled = False
        self.result = None
        self.enqueued = time.monotonic()
        self.first_token_at = None

    def send(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def cancel(self):
        """Called from the event loop when the client goes away: the worker drops the rows."""
        self.cancelled = True


def _holdback(text, stops, partial_markers):
    """How many characters at the end of `text` must wait: an incomplete character, the start of a
    stop string, or an unclosed placeholder the post-processing may still rewrite."""
    # Decoding the first bytes of a character gives U+FFFD; the rest of it rewrites that tail.
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    for opening, closing in partial_markers:
        start = text.rfind(opening)
        if start >= 0 and text.find(closing, start) < 0:
            hold = max(hold, len(text) - start)
    return hold


class IncrementalText:
    """A row's text, decoded a few tokens at a time: each new token decodes only the tokens since the
    last whole character (a window of a token or two), not the whole row again.

    `decode` of a window starts a new SentencePiece text, which drops a leading word marker; the
    window starts one emitted piece back so that both decodes drop the same one and their difference
    is the new text. A window ending inside a character (U+FFFD) waits for the rest of it. `context`
    (tokens before the text, not part of it) is the first window's start: the first token keeps its
    marker, as in a text that goes on after the context's."""

    def __init__(self, decode, context=()):
        self.decode = decode
        self.ids = list(context)
        self.text = ""
        self.start = 0  # the window: ids[start:] decoded, of which ids[start:read] are in `text`
        self.read = len(self.ids)
        self.context_text = decode(self.ids)

    def add(self, token):
        self.ids.append(token)
        before = self.decode(self.ids[self.start : self.read])
        after = self.decode(self.ids[self.start :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.start, self.read = self.read, len(self.ids)
        return self.text

    def whole(self):
        """The text of all the tokens decoded at once (it may end in a character `text` still holds back)."""
        return self.decode(self.ids)[len(self.context_text) :]


class Histogram:
    """Counts of observed values per upper bound, their sum and count (the Prometheus histogram)."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self):
        """{"buckets": [(upper bound, cumulative count), ..., (inf, count)], "sum", "count"}."""
        cumulative = list(itertools.accumulate(self.counts))
        return {"buckets": list(zip((*self.bounds, float("inf")), cumulative)), "sum": self.sum, "count": self.count}


LATENCY_BOUNDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def _top(logprobs, count):
    if not count:
        return ()
    values, ids = logprobs.topk(count)
    return tuple(zip(ids.tolist(), values.tolist()))


class _Live:
    """A row being prefilled or decoded: its job, its sampler's generator, its text so far."""

    def __init__(self, job, index, decode, device):
        self.job = job
        self.index = index
        self.row = job.rows[index]
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.row.seed)
        self.text = IncrementalText(decode, self.row.text_context)
        self.last_token = None
        self.last_token_at = None
        self.unsent_logprobs = []


class _Prefill:
    """A prompt being read, for the rows (choices) of one job that share it."""

    def __init__(self, lives):
        self.lives = lives
        self.ids = lives[0].row.prompt_ids
        self.done = 0
        self.passed_over = 0  # steps in a row this prompt was not read (`prefill_plan`)
        self.cache = DynamicCache()
        self.echo = any(live.row.echo_logprobs for live in lives)
        self.prompt_logprobs = [(self.ids[0], None, ())] if self.echo else None

    @property
    def left(self):
        return len(self.ids) - self.done


def prefill_plan(prefills, chunk, patience):
    """The (prompt, tokens) to read in this step, at most `chunk` tokens in all (always one chunk):
    the prompts passed over for `patience` steps in a row first, longest passed over first, then the
    others, fewest tokens left first (a short prompt gets its first token soon). Counts in each
    prompt's `passed_over` the steps it was not read: a stream of short prompts cannot starve a long
    one, which is read before them once passed over `patience` times."""
    budget, plan = chunk, []

    def order(prefill):
        overdue = prefill.passed_over >= patience
        return (not overdue, -prefill.passed_over if overdue else prefill.left)

    for prefill in sorted(prefills, key=order):
        size = min(chunk, prefill.left)
        if size > budget and budget < chunk:
            break
        budget -= size
        plan.append((prefill, size))
        if budget <= 0:
            break
    planned = {id(prefill) for prefill, _ in plan}
    for prefill in prefills:
        prefill.passed_over = 0 if id(prefill) in planned else prefill.passed_over + 1
    return plan


class _Batch:
    """The decoding rows, their KV cache left-padded to one length and its mask (1 = a real token)."""

    def __init__(self):
        self.lives = []
        self.cache = None
        self.mask = None

    def join(self, lives, cache, length):
        """Add `lives` whose (one-row) prompt cache holds `length` tokens."""
        rows = len(lives)
        mask = torch.ones(rows, length, dtype=torch.long, device=self._device(cache))
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.repeat(rows, 1, 1, 1), layer.values.repeat(rows, 1, 1, 1)
        if self.cache is None:
            self.lives, self.cache, self.mask = list(lives), cache, mask
            return
        total = max(length, self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat((_pad_left(mine.keys, total, 2), _pad_left(theirs.keys, total, 2)))
            mine.values = torch.cat((_pad_left(mine.values, total, 2), _pad_left(theirs.values, total, 2)))
        self.mask = torch.cat((_pad_left(self.mask, total, 1), _pad_left(mask, total, 1)))
        self.lives.extend(lives)

    def keep(self, kept):
        """Keep only the rows at positions `kept`, then cut the padding all of them have."""
        if not kept:
            self.lives, self.cache, self.mask = [], None, None
            return
        if len(kept) == len(self.lives):
            return
        index = torch.tensor(kept, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        lead = int(self.mask.any(0).long().argmax())
        self.mask = self.mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, lead:]
            layer.values = layer.values.index_select(0, index)[:, :, lead:]
        self.lives = [self.lives[position] for position in kept]

    @staticmethod
    def _device(cache):
        return cache.layers[0].keys.device


def _pad_left(tensor, length, dim):
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    padding = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, padding)


class Engine:
    """Owns the model in one worker thread; the event loop submits jobs and reads their events."""

    def __init__(self, model, tokenizer, max_batch_size=16, max_waiting=64, batch_wait=0.01, prefill_chunk=128, prefill_patience=4):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.batch_wait = batch_wait
        self.prefill_chunk = prefill_chunk
        self.prefill_patience = prefill_patience
        eos = model.generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else eos or [tokenizer.eos_token_id])
        self.eos_list = sorted(self.eos_ids)
        self.waiting = collections.deque()
        self.prefills = []  # _Prefill, in arrival order
        self.batch = _Batch()
        self.running_rows = 0  # rows prefilling or decoding
        self.batches = 0  # busy periods: the worker started from idle
        self.steps = 0
        self.cancelled_rows = 0  # rows dropped mid-generation because their client went away
        self.requests = 0  # generation jobs admitted
        self.prompt_tokens = 0  # prompt tokens prefilled
        self.generated_tokens = 0  # tokens sampled, eos included
        self.ttft = Histogram(LATENCY_BOUNDS)  # submit to a job's first token
        self.time_per_token = Histogram(LATENCY_BOUNDS)  # between a row's tokens
        self.condition = threading.Condition()
        self.closing = False  # no more jobs taken
        self.stopping = False  # the worker ends
        self.thread = threading.Thread(target=self._work, name="serve-engine", daemon=True)
        self.thread.start()

    @staticmethod
    def new_seed():
        return secrets.randbits(63)

    def partial_markers(self, job):
        # The ChatGLM2 post-processing rewrites "[[训练时间]]"; hold back an unclosed "[[" in chat.
        return (("[[", "]]"),) if job.postprocess else ()

    def submit(self, job):
        with self.condition:
            if self.closing:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are already waiting (the limit is {self.max_waiting})")
            self.waiting.append(job)
            self.condition.notify()

    def stats(self):
        """Gauges and counters (for /health and /metrics): waiting jobs, rows prefilling and decoding,
        busy periods, steps, cancelled rows, admitted requests, prompt tokens read, tokens generated."""
        with self.condition:
            return {
                "waiting": len(self.waiting),
                "running_rows": self.running_rows,
                "prefilling_rows": sum(len(prefill.lives) for prefill in self.prefills),
                "decoding_rows": len(self.batch.lives),
                "batches": self.batches,
                "steps": self.steps,
                "cancelled_rows": self.cancelled_rows,
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
            }

    def histograms(self):
        """Latency histograms in seconds (`Histogram.snapshot`): "ttft_seconds" (a request's submission
        to its first token) and "time_per_output_token_seconds" (between two tokens of a row)."""
        with self.condition:
            return {"ttft_seconds": self.ttft.snapshot(), "time_per_output_token_seconds": self.time_per_token.snapshot()}

    def refuse_waiting(self):
        """Take no more jobs and answer those still waiting (503, the server is shutting down); the
        running rows go on. The server calls it when it begins to shut down, so that a waiting
        request is answered at once rather than after the running ones or not at all."""
        with self.condition:
            self.closing = True
            waiting, self.waiting = list(self.waiting), collections.deque()
        for job in waiting:
            job.send("error", SHUTDOWN_WAITING, 503, "server_shutting_down")

    def close(self):
        """Refuse the waiting jobs, end the running rows at the next step (503: the server shut down
        before their answer was finished), and wait for the worker."""
        self.refuse_waiting()
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout=30)

    # --- the worker ---

    def _work(self):
        while True:
            with self.condition:
                while not (self.waiting or self.prefills or self.batch.lives or self.stopping):
                    self.condition.wait()
                if self.stopping:
                    break
                idle = not (self.prefills or self.batch.lives)
            if idle:
                time.sleep(self.batch_wait)  # let requests that arrive together start together
                with self.condition:
                    self.batches += 1
            try:
                self._step()
            except Exception:  # one failing step must not stop the server
                log.exception("a step of %d row(s) failed", self.running_rows)
                for job in {live.job for live in self._lives()}:
                    job.send("error", "generation failed on the server", 500, None)
                with self.condition:
                    self.prefills, self.batch, self.running_rows = [], _Batch(), 0
        for job in {live.job for live in self._lives()}:
            job.cancel()
            job.send("error", SHUTDOWN_RUNNING, 503, "server_shutting_down")

    def _lives(self):
        return [live for prefill in self.prefills for live in prefill.lives] + self.batch.lives

    @torch.inference_mode()
    def _step(self):
        embeds = self._admit()
        if embeds:
            self._embed(embeds)
        self._drop_cancelled()
        self._prefill()
        if self.batch.lives:
            self._decode()
        with self.condition:
            self.steps += 1
            self.running_rows = sum(len(prefill.lives) for prefill in self.prefills) + len(self.batch.lives)

    def _admit(self):
        """Move waiting generation jobs to prefill while their rows fit (first come first served);
        return the waiting embedding jobs that fit in one batch."""
        embeds, embed_rows = [], 0
        with self.condition:
            rows = self.running_rows
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                elif job.kind == "embed":
                    if embed_rows + len(job.rows) > self.max_batch_size:
                        break
                    embeds.append(self.waiting.popleft())
                    embed_rows += len(job.rows)
                elif rows + len(job.rows) <= self.max_batch_size:
                    self.waiting.popleft()
                    rows += len(job.rows)
                    self.requests += 1
                    self._start_prefills(job)
                else:
                    break
            self.running_rows = rows
        return embeds

    def _start_prefills(self, job):
        """One prefill per run of rows with the same prompt (the `n` choices of one)."""
        decode = self.tokenizer.decode_reply
        group = []
        for index, row in enumerate(job.rows):
            if group and row.prompt_ids != group[0].row.prompt_ids:
                self.prefills.append(_Prefill(group))
                group = []
            group.append(_Live(job, index, decode, self.model.device))
        self.prefills.append(_Prefill(group))

    def _drop_cancelled(self):
        cancelled = {live.job for live in self._lives() if live.job.cancelled}
        if not cancelled:
            return
        for job in cancelled:
            dropped = [row for row in job.rows if not row.done]
            for row in dropped:
                row.finish_reason = "cancelled"
            self.cancelled_rows += len(dropped)
            job.send("done")
        self.prefills = [prefill for prefill in self.prefills if prefill.lives[0].job not in cancelled]
        self.batch.keep([position for position, live in enumerate(self.batch.lives) if live.job not in cancelled])

    def _prefill(self):
        for prefill, size in prefill_plan(self.prefills, self.prefill_chunk, self.prefill_patience):
            self._prefill_chunk(prefill, size)

    def _prefill_chunk(self, prefill, size):
        start, end = prefill.done, prefill.done + size
        ids = torch.tensor([prefill.ids[start:end]], device=self.model.device)
        output = self.model(input_ids=ids, past_key_values=prefill.cache, use_cache=True, logits_to_keep=0 if prefill.echo else 1)
        prefill.done = end
        self.prompt_tokens += size
        logits = output.logits[0].float()
        if prefill.echo:
            # Position i's logits predict token i + 1: this chunk scores the prompt's tokens start+1 .. end.
            count = max(live.row.logprobs or 0 for live in prefill.lives)
            logprobs = torch.log_softmax(logits, dim=-1)
            for position in range(start, min(end, len(prefill.ids) - 1)):
                token = prefill.ids[position + 1]
                row_logprobs = logprobs[position - start]
                prefill.prompt_logprobs.append((token, float(row_logprobs[token]), _top(row_logprobs, count)))
        if prefill.left:
            return
        self.prefills.remove(prefill)
        joining = []
        for live in prefill.lives:
            if live.row.echo_logprobs:
                live.row.prompt_logprobs = prefill.prompt_logprobs
            self._take_token(live, logits[-1], time.monotonic())
            if not live.row.done:
                joining.append(live)
        if joining:
            self.batch.join(joining, prefill.cache, len(prefill.ids))

    def _decode(self):
        lives = self.batch.lives
        ids = torch.tensor([[live.last_token] for live in lives], device=self.model.device)
        mask = torch.cat((self.batch.mask, self.batch.mask.new_ones(len(lives), 1)), dim=1)
        output = self.model(input_ids=ids, attention_mask=mask, past_key_values=self.batch.cache, use_cache=True, logits_to_keep=1)
        self.batch.mask = mask
        logits = output.logits[:, -1].float()
        now = time.monotonic()
        for position, live in enumerate(lives):
            self._take_token(live, logits[position], now)
        self.batch.keep([position for position, live in enumerate(lives) if not live.row.done])

    def _take_token(self, live, logits, now):
        """Sample the row's next token from `logits` (float32, one row), then stream or finish it."""
        row, job = live.row, live.job
        token = self._choose(live, logits)
        row.generated += 1
        self.generated_tokens += 1
        if live.last_token_at is None:
            if job.first_token_at is None:
                job.first_token_at = now
                self.ttft.observe(now - job.enqueued)
        else:
            self.time_per_token.observe(now - live.last_token_at)
        live.last_token, live.last_token_at = token, now
        if row.logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            entry = (token, float(logprobs[token]), _top(logprobs, row.logprobs))
            row.token_logprobs.append(entry)
            live.unsent_logprobs.append(entry)
        if token in self.eos_ids:
            self._finish(live, "stop", self._final_text(live))
            return
        row.tokens.append(token)
        text = live.text.add(token)
        if job.postprocess:
            text = job.postprocess(text)
        start = job.answer_start(text) if job.answer_start else 0
        for stop in row.stop if start is not None else ():
            # Text already sent held back any start of a stop string, so the search starts there.
            cut = text.find(stop, max(start, len(row.sent) - len(stop) + 1))
            if cut >= 0:
                self._finish(live, "stop", text[:cut])
                return
        if row.generated >= row.max_tokens:
            self._finish(live, "length", self._final_text(live))
            return
        visible = text[: len(text) - _holdback(text, row.stop, self.partial_markers(job))]
        if len(visible) > len(row.sent) and visible.startswith(row.sent):
            job.send("delta", live.index, visible[len(row.sent) :], self._unsent(live))
            row.sent = visible

    def _choose(self, live, logits):
        """The row's next token: greedy at temperature 0, else sampled with its temperature and top_p
        from its own generator. eos is banned before `min_tokens`."""
        row = live.row
        logits = torch.nan_to_num(logits, nan=-float("inf"))
        if row.generated < row.min_tokens:
            logits[self.eos_list] = -float("inf")
        if row.temperature == 0 or not torch.isfinite(logits).any():
            return int(logits.argmax())
        logits = logits / row.temperature
        if row.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            probabilities = sorted_logits.softmax(-1)
            # Keep the smallest prefix whose probability reaches top_p (the first token always).
            remove = probabilities.cumsum(-1) - probabilities >= row.top_p
            logits = logits.scatter(0, order[remove], -float("inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=live.generator)[0])

    def _final_text(self, live):
        """The row's whole text, decoded once from all its tokens (it may end in a character that the
        incremental text still holds back)."""
        text = live.text.whole()
        return live.job.postprocess(text) if live.job.postprocess else text

    def _unsent(self, live):
        entries, live.unsent_logprobs = live.unsent_logprobs, []
        return entries

    def _finish(self, live, reason, text):
        row, job = live.row, live.job
        row.finish_reason = reason
        if text.startswith(row.sent) and len(text) > len(row.sent):
            job.send("delta", live.index, text[len(row.sent) :], self._unsent(live))
        job.send("finish", live.index, reason, text, self._unsent(live))
        row.sent = text
        if all(other.done for other in job.rows):
            job.send("done")

    def _embed(self, jobs):
        try:
            vectors = self._embedding_vectors([row for job in jobs for row in job.rows])
        except Exception:  # padding, the forward or the pooling: the jobs get an error, the worker goes on
            log.exception("an embedding batch of %d request(s) failed", len(jobs))
            for job in jobs:
                job.send("error", "embedding failed on the server", 500, None)
            return
        start = 0
        for job in jobs:
            job.result = vectors[start : start + len(job.rows)].tolist()
            start += len(job.rows)
            job.send("done")

    def _embedding_vectors(self, rows):
        """The normalized mean of the final hidden states over each row's prompt, [rows, hidden] on the CPU."""
        inputs = self.tokenizer.pad(
            [{"input_ids": row.prompt_ids} for row in rows], padding=True, padding_side="left", return_tensors="pt"
        )
        inputs = {name: tensor.to(self.model.device) for name, tensor in inputs.items()}
        hidden = self.model.transformer(**inputs).last_hidden_state.float()  # [batch, seq, hidden]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(vectors, dim=-1).cpu()
