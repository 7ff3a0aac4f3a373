"""The front end's half of a request: token deltas from the engine core become text and outputs.

Per request it keeps the tokens, log-probs and incremental detokenizer state of each sequence,
cuts stop strings (and tells the core to stop those sequences), and builds the RequestOutput the
caller sees: every step for a streaming request, once at the end otherwise. A "pull" request (the
server's streams) is only marked changed each step; its output is built when its consumer asks
(`latest`), so a consumer that falls behind costs one build for several steps' tokens. A sequence that a stop
string ended keeps the tokens it had then; whatever the core drew for it before the stop reached it
is dropped here, so outputs do not depend on how fast the stop travels.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.messages import CoreStepOutput, RequestFinal
from maga_transformer.engine.output import (AuxInfo, Detokenizer, RequestOutput, SequenceOutput, find_stop_string,
                                            hold_back_partial_stop)
from maga_transformer.engine.request import FinishReason

_seq_ids = itertools.count()


@dataclass
class FrontSeq:
    """One sequence as the front end sees it (the Detokenizer reads output_ids / is_finished / seq_id)."""
    output_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[list] = field(default_factory=list)
    cum_logprob: float = 0.0
    finish_reason: Optional[FinishReason] = None
    stopped_here: bool = False  # a stop string ended it: later tokens from the core are dropped
    text: str = ""
    seq_id: int = field(default_factory=lambda: next(_seq_ids))

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class FrontRequest:
    request_id: str
    prompt_token_ids: List[int]
    config: GenerateConfig
    stream: bool
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: List[FrontSeq] = field(default_factory=lambda: [FrontSeq()])
    num_updates: int = 0  # steps that brought it tokens (aux_info.iter_count until the final says)
    reuse_len: int = 0
    final: Optional[RequestFinal] = None
    pull: bool = False  # built on demand (latest), not every step

    def seq(self, index: int) -> FrontSeq:
        while len(self.seqs) <= index:  # n > 1: the core forks the samples after the prompt
            self.seqs.append(FrontSeq())
        return self.seqs[index]


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.requests: Dict[str, FrontRequest] = {}

    def add(self, request_id: str, prompt_token_ids: List[int], config: GenerateConfig, stream: bool,
            pull: bool = False) -> None:
        # stop strings need the text every step (to stop the core early): those requests stay eager
        pull = pull and stream and not config.stop_words_str
        self.requests[request_id] = FrontRequest(request_id, list(prompt_token_ids), config, stream, pull=pull)

    def process(self, step: CoreStepOutput) -> Tuple[List[RequestOutput], List[Tuple[str, int]], List[str]]:
        """(outputs to hand out, (request id, sequence index) the core must stop, ids of pull
        requests with new tokens) for one step. Final outputs are always built here."""
        touched: Dict[str, FrontRequest] = {}
        requests = self.requests
        for request_id, reuse_len in step.started:
            if request_id in requests:
                requests[request_id].reuse_len = reuse_len
        for delta in step.deltas:
            request = requests.get(delta[0])
            if request is not None:
                _apply_delta(request, delta)
                touched[request.request_id] = request
        for final in step.finals:
            request = requests.get(final.request_id)
            if request is not None:
                request.final = final
                touched[request.request_id] = request
        outputs, stops, changed = [], [], []
        for request in touched.values():
            request.num_updates += 1
            if request.pull and request.final is None:
                changed.append(request.request_id)
                continue
            output = self._output(request, stops)
            if output is not None:
                outputs.append(output)
        return outputs, stops, changed

    def latest(self, request_id: str) -> Optional[RequestOutput]:
        """A pull request's output as of now; None once it finished (its final was handed out)."""
        request = self.requests.get(request_id)
        if request is None or request.final is not None or not request.pull:
            return None  # an eager request's outputs were handed out as they were built
        return self._output(request, [])

    def fail_all(self, message: str) -> List[RequestOutput]:
        """The engine core is gone: every live request ends now with `message`."""
        outputs = []
        for request in list(self.requests.values()):
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish_reason = FinishReason.ERROR
            request.final = RequestFinal(request.request_id, (time.monotonic() - request.arrival_time) * 1e3,
                                         request.num_updates, request.reuse_len, 0, None, error=message)
            outputs.append(self._output(request, []))
        return outputs

    # ---- text and outputs -----------------------------------------------------------------------
    def _output(self, request: FrontRequest, stops: List[Tuple[str, int]]) -> Optional[RequestOutput]:
        finished = request.final is not None
        cfg = request.config
        if not (request.stream or finished or cfg.stop_words_str):
            return None
        beams = cfg.num_beams > 1
        seqs = request.seqs
        texts = [self._text(request, index, seq, stops, beams) for index, seq in enumerate(seqs)]
        if not (request.stream or finished):
            return None  # stop strings needed the text; the caller wants only the end
        if not finished and all(seq.finish_reason is not None for seq in seqs):
            return None  # stop strings ended it: the final output follows with the core's record
        output = self._build(request, texts, finished)
        if finished:
            self._forget(request)
        return output

    def _text(self, request: FrontRequest, index: int, seq: FrontSeq, stops: List[Tuple[str, int]],
              beams: bool) -> str:
        cfg = request.config
        if seq.stopped_here:
            return seq.text
        # beams are re-chosen every step: decode them whole
        text = self.detok.decode(seq.output_ids) if beams else self.detok.update(seq)
        words = cfg.stop_words_str
        if not words:
            return text
        text, found = _cut_at_stop(text, cfg)
        if found:
            if not beams:  # a beam's stop string only trims its text: the search decides when beams end
                if not seq.is_finished:
                    stops.append((request.request_id, index))
                    seq.finish_reason = FinishReason.STOP
                seq.stopped_here = True
                seq.text = text
            return text
        return text if seq.is_finished else hold_back_partial_stop(text, words)

    def _build(self, request: FrontRequest, texts: List[str], finished: bool) -> RequestOutput:
        cfg, final = request.config, request.final
        seq_outputs = [SequenceOutput(
            text=text, token_ids=list(seq.output_ids), finish_reason=seq.finish_reason, cum_logprob=seq.cum_logprob,
            logprobs=list(seq.logprobs), top_logprobs=list(seq.top_logprobs) if cfg.top_logprobs else None,
            logits=final.logits.get(index) if final else None,
            hidden_states=final.hidden.get(index) if final else None)
            for index, (seq, text) in enumerate(zip(request.seqs, texts))]
        beam_responses = None
        if final is not None and final.beams:
            seq_outputs = self._beam_outputs(request)
            beam_responses = [o.text for o in seq_outputs]
            seq_outputs = seq_outputs[:cfg.num_return_sequences]
        loss = final.loss if final is not None else None
        return RequestOutput(
            request_id=request.request_id, outputs=seq_outputs, finished=finished, aux_info=self._aux(request),
            prompt_token_ids=list(request.prompt_token_ids) if cfg.return_input_ids else None,
            loss=loss.tolist() if hasattr(loss, "tolist") else loss, beam_responses=beam_responses,
            error=final.error if final is not None else None)

    def _beam_outputs(self, request: FrontRequest) -> List[SequenceOutput]:
        outputs = []
        for token_ids, score in request.final.beams:
            text, _ = _cut_at_stop(self.detok.decode(token_ids), request.config)
            outputs.append(SequenceOutput(text=text, token_ids=list(token_ids), finish_reason=FinishReason.STOP,
                                          cum_logprob=score))
        return outputs

    @staticmethod
    def _aux(request: FrontRequest) -> AuxInfo:
        final, seqs = request.final, request.seqs
        if len(seqs) == 1:  # the common case, spared two generator passes (this runs per token)
            output_len, cum = len(seqs[0].output_ids), [seqs[0].cum_logprob]
        else:
            output_len, cum = max(len(s.output_ids) for s in seqs), [s.cum_logprob for s in seqs]
        if final is None:
            return AuxInfo(cost_time=(time.monotonic() - request.arrival_time) * 1e3, iter_count=request.num_updates,
                           input_len=len(request.prompt_token_ids), prefix_len=0, reuse_len=request.reuse_len,
                           output_len=output_len, cum_log_probs=cum)
        return AuxInfo(cost_time=final.cost_time_ms, iter_count=final.iter_count,
                       input_len=len(request.prompt_token_ids), prefix_len=0, reuse_len=final.reuse_len,
                       output_len=output_len, cum_log_probs=cum, num_preemptions=final.num_preemptions,
                       first_token_time=final.first_token_time_ms)

    def _forget(self, request: FrontRequest) -> None:
        for seq in request.seqs:
            self.detok.forget(seq)
        self.requests.pop(request.request_id, None)


def _cut_at_stop(text: str, cfg: GenerateConfig) -> Tuple[str, bool]:
    """The text up to its first stop string (through it with print_stop_words), and whether one was found."""
    found = find_stop_string(text, cfg.stop_words_str) if cfg.stop_words_str else None
    if found is None:
        return text, False
    return (text[:found[1]] if cfg.print_stop_words else text[:found[0]]), True


def _apply_delta(request: FrontRequest, delta) -> None:
    _, index, tokens, logprobs, top, reason, beam_score = delta
    seq = request.seq(index)
    if seq.stopped_here:
        return
    if beam_score is not None:
        seq.output_ids, seq.cum_logprob = tokens, beam_score
    else:
        seq.output_ids.extend(tokens)
        seq.logprobs.extend(logprobs)
        seq.cum_logprob += sum(logprobs)
        if top is not None:
            seq.top_logprobs.extend(top)
    if reason is not None:
        seq.finish_reason = FinishReason(reason)
