"""The batching worker: one thread owns the model and decodes the waiting requests together.

Requests are queued as jobs. Each job holds one or more rows (a row is one sequence to generate:
one choice of one prompt). The worker takes every waiting job that fits in `max_batch_size` rows
and runs ONE `model.generate` over all their rows, left-padded by the tokenizer (which also returns
the `position_ids`), with:

- `RowSampler`, a logits processor that samples each row with its own temperature, top_p and
  `torch.Generator` (so `seed` gives the same answer whatever else is in the batch) and hands
  `generate` a one-hot score, so `generate` runs in greedy mode and picks that token;
- `RowStreamer`, a streamer that decodes each row as its tokens arrive, sends the new text to the
  request's asyncio queue, and ends a row at eos, at a stop string, at its `max_tokens`, or when
  its client went away;
- `RowStopping`, a stopping criterion that tells `generate` which rows have ended (a finished row
  is padded by `generate` until the whole batch ends).

Jobs that arrive while a batch runs wait for the next one. The queue is bounded: `submit` raises
`Busy` past `max_waiting` waiting jobs, and the server answers 429 with Retry-After.
"""

import collections
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("serve.engine")


class Busy(Exception):
    """The waiting queue is full."""


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
    tokens: list = field(default_factory=list)  # generated ids, eos excluded
    sent: str = ""  # text already sent to the client
    finish_reason: str = None  # "stop", "length", or "cancelled"
    generated: int = 0  # tokens generated, eos included

    @property
    def done(self):
        return self.finish_reason is not None


class Job:
    """A request's rows and the channel back to it. `events` receives, from the worker thread:
    ("delta", row_index, text), ("finish", row_index, finish_reason, text_of_the_whole_row),
    ("done",) once every row has finished, or ("error", message)."""

    _ids = itertools.count()

    def __init__(self, rows, loop, events, postprocess=None, kind="generate"):
        self.number = next(self._ids)
        self.rows = rows
        self.loop = loop
        self.events = events
        self.postprocess = postprocess
        self.kind = kind
        self.cancelled = False
        self.result = None
        self.enqueued = time.monotonic()

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


class RowSampler(LogitsProcessor):
    """Per-row temperature / top_p / seeded sampling; returns scores whose argmax is the chosen token."""

    def __init__(self, rows, device, eos_ids):
        self.rows = rows
        self.eos_ids = sorted(eos_ids)
        self.generators = []
        for row in rows:
            generator = torch.Generator(device=device)
            generator.manual_seed(row.seed)
            self.generators.append(generator)

    def __call__(self, input_ids, scores):
        scores = scores.float()
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for index, (row, generator) in enumerate(zip(self.rows, self.generators)):
            logits = torch.nan_to_num(scores[index], nan=-float("inf"))
            if row.generated < row.min_tokens:
                logits[self.eos_ids] = -float("inf")
            if row.done or row.temperature == 0 or not torch.isfinite(logits).any():
                chosen[index] = logits.argmax()
                continue
            logits = logits / row.temperature
            if row.top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                probabilities = sorted_logits.softmax(-1)
                # Keep the smallest prefix whose probability reaches top_p (the first token always).
                remove = probabilities.cumsum(-1) - probabilities >= row.top_p
                logits = logits.scatter(0, order[remove], -float("inf"))
            chosen[index] = torch.multinomial(logits.softmax(-1), 1, generator=generator)[0]
        one_hot = torch.full_like(scores, -float("inf"))
        one_hot.scatter_(1, chosen[:, None], 0.0)
        return one_hot


class RowStreamer(BaseStreamer):
    """Decodes each row as tokens arrive and sends the new text to its job."""

    def __init__(self, engine, jobs):
        self.engine = engine
        self.jobs = jobs
        self.places = [(job, index) for job in jobs for index in range(len(job.rows))]
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate first passes the prompt ids
            self.prompt_seen = True
            return
        for (job, index), token in zip(self.places, value.tolist()):
            row = job.rows[index]
            if row.done:
                continue
            if job.cancelled:
                row.finish_reason = "cancelled"
                self.engine.cancelled_rows += 1
                continue
            row.generated += 1
            if token in self.engine.eos_ids:
                self.finish(job, index, "stop")
                continue
            row.tokens.append(token)
            text = self.engine.text_of(job, row)
            for stop in row.stop:
                cut = text.find(stop)
                if cut >= 0:
                    self.finish(job, index, "stop", text[:cut])
                    break
            else:
                if row.generated >= row.max_tokens:
                    self.finish(job, index, "length", text)
                    continue
                visible = text[: len(text) - _holdback(text, row.stop, self.engine.partial_markers(job))]
                if visible.startswith(row.sent) and len(visible) > len(row.sent):
                    job.send("delta", index, visible[len(row.sent) :])
                    row.sent = visible

    def finish(self, job, index, reason, text=None):
        row = job.rows[index]
        row.finish_reason = reason
        if text is None:
            text = self.engine.text_of(job, row)
        if text.startswith(row.sent) and len(text) > len(row.sent):
            job.send("delta", index, text[len(row.sent) :])
        job.send("finish", index, reason, text)
        row.sent = text
        if all(other.done for other in job.rows):
            job.send("done")

    def end(self):
        pass


class RowStopping(StoppingCriteria):
    def __init__(self, rows):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns the model in one worker thread; the event loop submits jobs and reads their events."""

    def __init__(self, model, tokenizer, max_batch_size=16, max_waiting=64, batch_wait=0.01):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.batch_wait = batch_wait
        eos = model.generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else eos or [tokenizer.eos_token_id])
        self.pad_id = tokenizer.pad_token_id
        self.waiting = collections.deque()
        self.running = []  # the jobs of the batch being decoded
        self.running_rows = 0
        self.batches = 0
        self.cancelled_rows = 0  # rows dropped mid-generation because their client went away
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="serve-engine", daemon=True)
        self.thread.start()

    @staticmethod
    def new_seed():
        return secrets.randbits(63)

    def text_of(self, job, row):
        text = self.tokenizer.decode(row.tokens)
        return job.postprocess(text) if job.postprocess else text

    def partial_markers(self, job):
        # The ChatGLM2 post-processing rewrites "[[训练时间]]"; hold back an unclosed "[[" in chat.
        return (("[[", "]]"),) if job.postprocess else ()

    def submit(self, job):
        with self.condition:
            if self.stopping:
                raise Busy("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are already waiting (the limit is {self.max_waiting})")
            self.waiting.append(job)
            self.condition.notify()

    def stats(self):
        with self.condition:
            return {
                "waiting": len(self.waiting),
                "running_rows": self.running_rows,
                "batches": self.batches,
                "cancelled_rows": self.cancelled_rows,
            }

    def close(self):
        """Stop taking jobs, end the running batch at its next step, and wait for the worker."""
        with self.condition:
            self.stopping = True
            for job in self.running:
                job.cancel()
            self.condition.notify()
        self.thread.join(timeout=30)

    def _take_batch(self):
        """Wait for jobs; return the waiting ones that fit in one batch, embeddings and generation apart."""
        with self.condition:
            while not self.waiting and not self.stopping:
                self.condition.wait()
            if self.stopping:
                return None
        time.sleep(self.batch_wait)  # let requests that arrive together join the batch
        with self.condition:
            kind = self.waiting[0].kind
            batch, rows, keep = [], 0, collections.deque()
            while self.waiting:
                job = self.waiting.popleft()
                if job.cancelled:
                    continue
                if job.kind == kind and rows + len(job.rows) <= self.max_batch_size:
                    batch.append(job)
                    rows += len(job.rows)
                else:
                    keep.append(job)
            self.waiting = keep
            self.running = batch
            self.running_rows = rows
            return batch

    def _work(self):
        while (batch := self._take_batch()) is not None:
            if not batch:
                continue
            try:
                if batch[0].kind == "embed":
                    self._embed(batch)
                else:
                    self._generate(batch)
            except Exception:  # one failing batch must not stop the server
                log.exception("batch of %d request(s) failed", len(batch))
                for job in batch:
                    job.send("error", "generation failed on the server")
            finally:
                with self.condition:
                    self.running = []
                    self.running_rows = 0
                    self.batches += 1

    @torch.inference_mode()
    def _generate(self, jobs):
        rows = [row for job in jobs for row in job.rows]
        inputs = self.tokenizer.pad([{"input_ids": row.prompt_ids} for row in rows], padding=True, return_tensors="pt")
        inputs = {name: tensor.to(self.model.device) for name, tensor in inputs.items()}
        self.model.generate(
            **inputs,
            max_new_tokens=max(row.max_tokens for row in rows),
            do_sample=False,
            logits_processor=LogitsProcessorList([RowSampler(rows, self.model.device, self.eos_ids)]),
            stopping_criteria=StoppingCriteriaList([RowStopping(rows)]),
            streamer=RowStreamer(self, jobs),
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
        )
        # generate can end (max_new_tokens) in the same step a row reaches its limit; every row is
        # finished by the streamer, so nothing is left open here unless the client went away.
        for job in jobs:
            if job.cancelled:
                job.send("done")

    @torch.inference_mode()
    def _embed(self, jobs):
        rows = [row for job in jobs for row in job.rows]
        inputs = self.tokenizer.pad([{"input_ids": row.prompt_ids} for row in rows], padding=True, return_tensors="pt")
        inputs = {name: tensor.to(self.model.device) for name, tensor in inputs.items()}
        hidden = self.model.transformer(**inputs).last_hidden_state.float()  # [batch, seq, hidden]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * mask).sum(1) / mask.sum(1)
        vectors = torch.nn.functional.normalize(vectors, dim=-1).cpu()
        start = 0
        for job in jobs:
            job.result = vectors[start : start + len(job.rows)].tolist()
            start += len(job.rows)
            job.send("done")
