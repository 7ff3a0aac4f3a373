"""After the model ran: advance sequences, sample or beam-search, stop on tokens, and emit what
changed as token deltas (the front end turns them into text and applies stop strings)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from maga_transformer.engine import beam_search
from maga_transformer.engine.model_runner import StepResult
from maga_transformer.engine.messages import CoreStepOutput, RequestFinal
from maga_transformer.engine.output import ends_with_token_stop
from maga_transformer.engine.request import FinishReason, Request, RequestStatus, Sequence
from maga_transformer.engine.sampler import SamplingRow, sample
from maga_transformer.engine.scheduler import Scheduler, SchedulerOutput
from maga_transformer.engine.transfer import HostCopy, to_device

_SEED_STRIDE = 1_000_003  # separates the random streams of a request's samples


@dataclass
class PendingDraw:
    """One batched draw launched on the device and not yet read back (overlap scheduling reads it
    one step later). `tokens` stays on the device: the next step may take its input ids from it."""
    pairs: List[Tuple[Request, Sequence]]
    tokens: torch.Tensor
    host: HostCopy  # token ids, log-probs, top log-probs (values, ids), copied back asynchronously
    logits: Optional[torch.Tensor] = None  # the rows' logits / hidden, for return_logits / hidden states
    hidden: Optional[torch.Tensor] = None


Ready = List[Tuple[Request, List[int]]]  # requests whose sequences reached their end, with their logits rows


class StepProcessor:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def process(self, plan: SchedulerOutput, result: StepResult) -> Ready:
        """Draw (or beam-search) the next token of every request that reached its end this step."""
        ready = self.advance(plan, result)
        sampling = [(r, rows) for r, rows in ready if not r.is_beam_search]
        if sampling:
            self.complete_draw(self.launch_draw(sampling, result))
        for request, rows in ready:
            if request.is_beam_search:
                self._beam_step(request, result.logits[rows])
        return ready

    def advance(self, plan: SchedulerOutput, result: StepResult, register: bool = True) -> Ready:
        """Account for the tokens the step computed. With register=False the blocks they filled are
        offered to the prefix cache later (register_blocks), once the pending tokens are known."""
        ready: Ready = []
        for item in plan.scheduled:
            request = item.request
            request.num_steps += 1
            seqs = request.live_seqs
            for seq in seqs:
                seq.num_computed_tokens += item.num_tokens
                if register:
                    self.scheduler.kv.register_computed_blocks(seq)
                if seq.seq_id in result.prompt_logprobs:
                    self._add_prompt_logprobs(request, result.prompt_logprobs[seq.seq_id])
            rows = [result.row_of_seq[s.seq_id] for s in seqs if s.seq_id in result.row_of_seq]
            if not rows:
                continue  # a prefill chunk that did not reach the end of the prompt
            assert len(rows) == len(seqs)
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            ready.append((request, rows))
        return ready

    def register_blocks(self, ready: Ready) -> None:
        for request, _ in ready:
            for seq in request.live_seqs:
                self.scheduler.kv.register_computed_blocks(seq)

    # ---- sampling ---------------------------------------------------------------------------
    def _fork_samples(self, request: Request, rows: List[int]) -> List[int]:
        """After the prompt: n samples share its blocks and start from its logits row."""
        if request.forked:
            return rows
        request.forked = True
        parent = request.seqs[0]
        for index in range(1, request.config.num_return_sequences):
            child = self.scheduler.kv.fork(parent)
            child.sample_index = index
            request.seqs.append(child)
        return rows * len(request.seqs)

    def launch_draw(self, batch: Ready, result: StepResult, pending: int = 0) -> PendingDraw:
        """One batched draw for every sampling sequence of the step, whatever request it belongs to;
        queued on the device without waiting for it. pending: tokens each sequence has drawn but not
        appended yet (overlap scheduling), which count towards seeds and min_new_tokens."""
        pairs, rows = [], []
        for request, request_rows in batch:
            request_rows = self._fork_samples(request, request_rows)  # before listing the sequences: it adds them
            pairs.extend((request, seq) for seq in request.live_seqs)
            rows.extend(request_rows)
        logits, hidden = result.logits, result.hidden
        if rows != list(range(logits.shape[0])):
            index = to_device(rows, torch.long, logits.device)
            logits = logits[index]
            hidden = hidden[index] if hidden is not None else None
        drawn = sample(logits, [self._sampling_row(request, seq, pending) for request, seq in pairs])
        top = drawn.top_logprobs or (None, None)
        wants_logits = any(r.config.return_logits for r, _ in pairs)
        return PendingDraw(pairs, drawn.token_ids, HostCopy([drawn.token_ids, drawn.logprobs, top[0], top[1]]),
                           logits if wants_logits else None, hidden)

    def complete_draw(self, draw: PendingDraw) -> None:
        """Wait for the draw, then append each token and check the token stops. Sequences finished
        meanwhile (an abort, or an earlier step's stop under overlap) drop theirs."""
        token_ids, logprobs, top_values, top_ids = draw.host.get()
        landed = time.monotonic()  # the tokens are on the host now: a first token's honest time
        tokens, logprobs = token_ids.tolist(), logprobs.tolist()
        top = (top_values.tolist(), top_ids.tolist()) if top_values is not None else None
        for i, (request, seq) in enumerate(draw.pairs):
            if seq.is_finished or request.status == RequestStatus.FINISHED:
                continue
            seq.token_ids.append(tokens[i])
            if len(seq.token_ids) == seq.prompt_len + 1:  # advance() stamped it when the step was queued
                request.first_token_time = landed
            seq.cum_logprob += logprobs[i]
            seq.output_logprobs.append(logprobs[i])
            if request.config.top_logprobs:
                k = request.config.top_logprobs
                seq.output_top_logprobs.append(list(zip(top[1][i][:k], top[0][i][:k])))
            # kept on the device (a copy: graph outputs are overwritten); the final record reads them once
            if draw.logits is not None and request.config.return_logits:
                request.extras.setdefault("logits", {})[seq.sample_index] = draw.logits[i].clone()
            if draw.hidden is not None and request.config.return_hidden_states:
                request.extras.setdefault("hidden", {})[seq.sample_index] = draw.hidden[i].clone()
            self._check_token_stop(request, seq)

    def _sampling_row(self, request: Request, seq: Sequence, pending: int = 0) -> SamplingRow:
        cfg = request.config
        num_outputs = seq.num_output_tokens + pending
        single_bad = [w[0] for w in cfg.bad_words_list if len(w) == 1]
        penalised_outputs = seq.output_ids if (cfg.presence_penalty or cfg.frequency_penalty) else ()
        return SamplingRow(
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty, presence_penalty=cfg.presence_penalty,
            frequency_penalty=cfg.frequency_penalty, seed=cfg.random_seed,
            seed_offset=seq.sample_index * _SEED_STRIDE + num_outputs,
            history_token_ids=seq.token_ids[request.prefix_len:] if request.prefix_len else seq.token_ids,
            output_token_ids=penalised_outputs, eos_token_ids=request.eos_token_ids,
            suppress_eos=num_outputs < cfg.min_new_tokens, bad_words_ids=single_bad,
            top_logprobs=cfg.top_logprobs)

    def _check_token_stop(self, request: Request, seq: Sequence) -> None:
        cfg = request.config
        token = seq.token_ids[-1]
        if token in request.eos_token_ids and not cfg.ignore_eos:
            seq.finish_reason = FinishReason.STOP
        elif cfg.stop_words_list and ends_with_token_stop(seq.output_ids, cfg.stop_words_list):
            seq.finish_reason = FinishReason.STOP
        elif seq.num_output_tokens >= request.max_new_tokens:
            seq.finish_reason = FinishReason.LENGTH
        if seq.is_finished:
            self.scheduler.free_sequence(seq)

    # ---- beam search ------------------------------------------------------------------------
    def _beam_step(self, request: Request, logits: torch.Tensor) -> None:
        beams = request.live_seqs
        candidates = beam_search.beam_candidates(request, beams, logits)
        beam_search.update_finished(request, candidates, beams)
        running = beam_search.next_running(candidates, request.config.num_beams)
        new_beams = []
        for cand in running:
            child = self.scheduler.kv.fork(beams[cand.parent])
            child.token_ids.append(cand.token)
            child.cum_logprob = cand.score
            new_beams.append(child)
        for old in beams:
            self.scheduler.free_sequence(old)
        request.seqs = new_beams
        if beam_search.search_finished(request, candidates, running, new_beams[0].num_output_tokens):
            for seq in new_beams:
                seq.finish_reason = FinishReason.STOP
                self.scheduler.free_sequence(seq)

    # ---- outputs ----------------------------------------------------------------------------
    def _add_prompt_logprobs(self, request: Request, chunk) -> None:
        start, logprobs = chunk  # placed by position: a recompute after preemption overwrites, never appends
        if request.prompt_loss is None:
            request.prompt_loss = [0.0] * max(request.prompt_len - 1, 0)
        request.prompt_loss[start:start + logprobs.numel()] = logprobs.tolist()

    def emit(self, requests: List[Request], out: CoreStepOutput) -> None:
        """Add to `out` what the step changed for each request: new tokens of requests that stream
        (or of any request that just finished), and the final record of a finished one."""
        for request in requests:
            if request.status == RequestStatus.FINISHED:
                continue  # finished earlier in this step (an abort); its output went out then
            finished = all(seq.is_finished for seq in request.seqs)
            if finished:
                self.scheduler.finish_request(request)
            if finished or request.emits_every_step:
                self._deltas(request, out)
            if finished:
                out.finals.append(self._final(request))

    def finish(self, request: Request, out: CoreStepOutput) -> None:
        """Finish a request now (abort, timeout, error): release everything, final record."""
        self.scheduler.finish_request(request)
        self._deltas(request, out)
        out.finals.append(self._final(request))

    @staticmethod
    def _deltas(request: Request, out: CoreStepOutput) -> None:
        rid, beams, top = request.request_id, request.is_beam_search, request.config.top_logprobs
        if not request.started_sent and request.first_token_time is not None:
            request.started_sent = True
            out.started.append((rid, request.reuse_len - request.prefix_len))
        for index, seq in enumerate(request.seqs):
            sent = seq.num_sent
            new = seq.token_ids[seq.prompt_len + sent:]
            reason = seq.finish_reason
            if not new and (reason is None or seq.finish_sent):
                continue
            seq.finish_sent = reason is not None
            if beams:  # re-chosen every step: the whole beam, and its score
                out.deltas.append((rid, index, seq.output_ids, [], None, _value(reason), seq.cum_logprob))
                continue
            seq.num_sent = sent + len(new)
            out.deltas.append((rid, index, new, seq.output_logprobs[sent:],
                               seq.output_top_logprobs[sent:] if top else None, _value(reason), None))

    def _final(self, request: Request) -> RequestFinal:
        now = time.monotonic()
        first = request.first_token_time
        return RequestFinal(
            request_id=request.request_id, cost_time_ms=(now - request.arrival_time) * 1e3,
            iter_count=request.num_steps, reuse_len=request.reuse_len - request.prefix_len, num_preemptions=request.num_preemptions,
            first_token_time_ms=None if first is None else (first - request.arrival_time) * 1e3,
            loss=self._loss(request), logits=_host_rows(request.extras.get("logits")),
            hidden=_host_rows(request.extras.get("hidden")),
            beams=[(list(h.token_ids), h.score) for h in request.beam_finished] if request.is_beam_search else None,
            error=request.error)

    @staticmethod
    def _loss(request: Request):
        mode = request.config.calculate_loss
        if not mode or not request.prompt_loss:
            return None
        nll = -torch.tensor(request.prompt_loss, dtype=torch.float64)
        # rtp-llm's meaning: 1 = perplexity of the prompt, exp(mean NLL); 2 = per-token NLL
        return float(nll.mean().exp()) if mode == 1 else nll.numpy()


def _value(reason: Optional[FinishReason]) -> Optional[str]:
    return None if reason is None else reason.value


def _host_rows(rows: Optional[Dict[int, torch.Tensor]]) -> Dict[int, np.ndarray]:
    """Device rows kept by the draws, as float32 numpy arrays (one copy each, no Python loop)."""
    return {index: row.float().cpu().numpy() for index, row in (rows or {}).items()}
