"""Per-request generation parameters (rtp-llm's generate_config), validated once at the edge."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

MAX_NEW_TOKENS_LIMIT = 1 << 22  # above this a request is a mistake, not a long answer
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_TOKEN_ID = (1 << 31) - 1  # no vocabulary is larger; beyond int64 a token-id tensor cannot even be built
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: len ** penalty stays a finite, non-zero float for any length
_ALIASES = {
    "gen_length": "max_new_tokens",
    "output_logits": "return_logits",
    "output_hidden_states": "return_hidden_states",
    "max_tokens": "max_new_tokens",
    "n": "num_return_sequences",
    "seed": "random_seed",
}


@dataclass
class GenerateConfig:
    """Defaults follow rtp-llm: sampling with top_p 0.95 unless top_k=1 / temperature=0 asks for greedy."""

    max_new_tokens: int = 1000
    min_new_tokens: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    top_k: int = 0
    top_p: float = 0.95
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    top_logprobs: int = 0  # report the log-probs of this many most likely tokens at each step
    length_penalty: float = 1.0
    random_seed: Optional[int] = None
    stop_words_str: List[str] = field(default_factory=list)
    stop_words_list: List[List[int]] = field(default_factory=list)
    print_stop_words: bool = False
    ignore_eos: bool = False
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    bad_words_list: List[List[int]] = field(default_factory=list)
    timeout_ms: Optional[int] = None
    calculate_loss: int = 0
    return_logits: bool = False
    return_hidden_states: bool = False
    return_input_ids: bool = False
    return_output_ids: bool = False
    return_incremental: bool = False
    yield_generator: bool = False
    adapter_name: Optional[str] = None
    task_id: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> "GenerateConfig":
        """Build from user JSON / keyword arguments; unknown fields are an error that names them."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise ValueError(f"generate_config: expected an object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict = {}
        for key, value in values.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                raise ValueError(f"generate_config: unknown field {key!r}")
            kwargs[name] = value
        return cls(**kwargs)

    def validate(self) -> None:
        _check_int(self, "max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT)
        _check_int(self, "min_new_tokens", 0, MAX_NEW_TOKENS_LIMIT)
        _check_int(self, "num_beams", 1, 64)
        _check_int(self, "num_return_sequences", 1, 64)
        _check_int(self, "top_k", 0, None)
        _check_int(self, "calculate_loss", 0, 2)
        _check_int(self, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        _check_float(self, "temperature", 0.0, None, low_open=False)
        _check_float(self, "top_p", 0.0, 1.0, low_open=True)
        _check_float(self, "repetition_penalty", 0.0, None, low_open=True)
        _check_float(self, "length_penalty", -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY, low_open=False)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(self, name, -2.0, 2.0, low_open=False)
        for name in ("random_seed", "timeout_ms"):
            if getattr(self, name) is not None:
                _check_int(self, name, 0, None)
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(self, name) is not None:
                _check_int(self, name, 0, MAX_TOKEN_ID)
        for name in ("print_stop_words", "ignore_eos", "return_logits", "return_hidden_states",
                     "return_input_ids", "return_output_ids", "return_incremental", "yield_generator"):
            _check_bool(self, name)
        if isinstance(self.stop_words_str, str):
            self.stop_words_str = [self.stop_words_str]
        if not isinstance(self.stop_words_str, list) or not all(
                isinstance(s, str) and s for s in self.stop_words_str):
            raise ValueError("stop_words_str: expected a list of non-empty strings")
        self.stop_words_list = _token_lists(self.stop_words_list, "stop_words_list")
        self.bad_words_list = _token_lists(self.bad_words_list, "bad_words_list")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.adapter_name is not None and (not isinstance(self.adapter_name, str) or not self.adapter_name):
            raise ValueError(f"adapter_name: expected the name of a served LoRA adapter, got {self.adapter_name!r} "
                             "(a list is for prompt_batch, one name per prompt)")
        if self.task_id is not None:
            if isinstance(self.task_id, bool) or not isinstance(self.task_id, (str, int)) or self.task_id == "":
                raise ValueError(f"task_id: expected the id of a MULTI_TASK_PROMPT task, got {self.task_id!r}")
            self.task_id = str(self.task_id)


def _check_int(cfg: GenerateConfig, name: str, low: Optional[int], high: Optional[int]) -> None:
    value = getattr(cfg, name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
        setattr(cfg, name, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")


def _check_float(cfg: GenerateConfig, name: str, low: Optional[float], high: Optional[float],
                 low_open: bool) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}: expected a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        raise ValueError(f"{name}: must be a finite number, got {value}") from None
    if math.isinf(value):  # 1e999 in JSON reads as inf: a ratio or a power of it is nan or a division by zero
        raise ValueError(f"{name}: must be a finite number, got {value}")
    setattr(cfg, name, value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")


def _check_bool(cfg: GenerateConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, int) and value in (0, 1):
        setattr(cfg, name, bool(value))
        return
    raise ValueError(f"{name}: expected a boolean, got {value!r}")


def _token_lists(value: Any, name: str) -> List[List[int]]:
    if not isinstance(value, list):
        raise ValueError(f"{name}: expected a list of token-id lists")
    out = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            item = [item]
        if (not isinstance(item, list) or not item
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in item)):
            raise ValueError(f"{name}: expected a list of non-empty lists of token ids, got {item!r}")
        out.append(list(item))
    return out
