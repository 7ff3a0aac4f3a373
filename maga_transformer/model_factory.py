"""ModelFactory: a Hugging Face checkpoint directory (or GGUF, or nothing: the embedded default
model) to a ready model with its tokenizer and, on first use, its engine."""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import replace
from typing import List, Optional, Tuple, Union

import torch

from maga_transformer.config.engine_config import EngineConfig, env_bool
from maga_transformer.config.model_config import ACT_TYPE, WEIGHT_TYPE, ModelConfig
from maga_transformer.ops.linear import fp8_emulated, fp8_supported
from maga_transformer.engine.core_client import EngineProcessClient, StartingCore
from maga_transformer.engine.core_main import CoreLaunch
from maga_transformer.engine.engine import Engine
from maga_transformer.lora.config import LoraConfig
from maga_transformer.lora.merge import merged_tensors
from maga_transformer.lora.peft_reader import read_peft_adapter
from maga_transformer.ptuning.reader import find_ptuning_dir
from maga_transformer.ptuning.task_prompts import task_prompts_from_env
from maga_transformer.config.placement import choose_placement
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.distributed.tensor_parallel import TensorParallel
from maga_transformer.model_loader import iter_checkpoint_tensors, load_tokenizer, resolve_model_dir
from maga_transformer.model_loader.resolve import resolve_tokenizer_dir
from maga_transformer.models import resolve_model_class
from maga_transformer.models.decoder import DecoderModel

logger = logging.getLogger(__name__)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _configured_eos_ids(ckpt_dir: str, hf_config: dict) -> Optional[List[int]]:
    """generation_config.json first (what transformers' generate uses), then config.json."""
    for source in (_read_json(os.path.join(ckpt_dir, "generation_config.json")), hf_config):
        value = source.get("eos_token_id")
        if value is not None:
            return [int(v) for v in value] if isinstance(value, list) else [int(value)]
    return None


def _tokenizer_eos_ids(tokenizer) -> List[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


class AsyncModel:
    """A loaded model: tokenizer, configs and its engine. In the process mode (the default) the
    weights live in the engine-core process and `model` is None; in-process (ENGINE_PROCESS=0 /
    EngineConfig(engine_process=False)) `model` is the DecoderModel and the engine is built on
    first use."""

    def __init__(self, model: Optional[DecoderModel], tokenizer, config: ModelConfig, hf_config: dict,
                 eos_token_ids: List[int], engine_config: Optional[EngineConfig] = None,
                 arch=None, engine=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.hf_config = hf_config
        self.eos_token_ids = eos_token_ids
        self.engine_config = engine_config or EngineConfig.from_env()
        self._arch = arch if arch is not None else model.arch
        self._engine = engine
        self._engine_lock = threading.Lock()
        self.lora = lora_config_of(config)

    @property
    def arch(self):
        return self._arch

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len  # set at load: the user's, else the model's context length

    @property
    def engine(self) -> Union[Engine, EngineProcessClient]:
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.model, self.tokenizer, self.engine_config, self.max_seq_len,
                                      self.config.seq_size_per_block, self.eos_token_ids, self.lora,
                                      find_ptuning_dir(self.config.ptuning_path, self.config.ckpt_path))
                self._engine.set_task_prompts(tokenize_task_prompts(self.tokenizer))
            return self._engine

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.stop()


class ModelFactory:
    @staticmethod
    def from_huggingface(name_or_path: Union[str, ModelConfig, None] = None,
                         model_config: Optional[ModelConfig] = None,
                         engine_config: Optional[EngineConfig] = None,
                         device: Union[str, torch.device, None] = None,
                         parallel: Optional[ParallelConfig] = None) -> AsyncModel:
        """Load a checkpoint. `name_or_path` may be a directory, a .gguf file, a name mapped by
        MAGA_MODEL_DIRS, a ModelConfig, or None for the embedded default model (SmolLM2-135M).
        `device` defaults to $MAGA_DEVICE, else the GPU when one is visible (config/placement.py; the
        compute dtype follows: the checkpoint's half precision on CUDA, fp32 on CPU, unless
        act_type says otherwise). `parallel`: tensor parallelism (TP_SIZE etc.; docs/MultiGPU.md)."""
        config, device, dtype = _placed(name_or_path, model_config, device)
        return _load(config, engine_config, device, dtype, parallel or ParallelConfig())

    @staticmethod
    def create_from_env(env: Optional[dict] = None) -> AsyncModel:
        """The seed's environment variables: MODEL_TYPE, CHECKPOINT_PATH, TOKENIZER_PATH, MAX_SEQ_LEN, ..."""
        config, engine_config, parallel = _configs_from_env(dict(os.environ if env is None else env))
        return ModelFactory.from_huggingface(config, engine_config=engine_config, parallel=parallel)

    @staticmethod
    def worker_launch_from_env(env: Optional[dict] = None) -> CoreLaunch:
        """What the tensor-parallel workers of a machine without the HTTP server build, from the same
        environment as the first machine's (start_server with WORLD_RANK > 0, or torchrun's ranks)."""
        config, engine_config, parallel = _configs_from_env(dict(os.environ if env is None else env))
        config, device, dtype = _placed(config, None, None)
        config, _, _, arch = _model_plan(config)
        _check_parallel(parallel, arch, device, engine_config)
        _check_quantization(config, device, dtype)
        return _core_launch(config, engine_config, device, dtype, parallel, [])


def _configs_from_env(env: dict) -> Tuple[ModelConfig, EngineConfig, ParallelConfig]:
    env_bool(env, "ASYNC_MODE", True)  # accepted for rtp-llm's scripts: we always batch dynamically
    try:
        max_seq_len = int(env.get("MAX_SEQ_LEN") or 0)
        block = int(env.get("SEQ_SIZE_PER_BLOCK") or 8)
    except ValueError as err:
        raise ValueError(f"MAX_SEQ_LEN / SEQ_SIZE_PER_BLOCK: expected an integer ({err})") from None
    config = ModelConfig(
        model_type=env.get("MODEL_TYPE", ""), ckpt_path=env.get("CHECKPOINT_PATH", ""),
        tokenizer_path=env.get("TOKENIZER_PATH", ""), max_seq_len=max_seq_len, seq_size_per_block=block,
        weight_type=WEIGHT_TYPE.from_str(env.get("WEIGHT_TYPE") or "fp32"),
        act_type=ACT_TYPE.from_str(env["ACT_TYPE"]) if env.get("ACT_TYPE") else None,
        lora_infos=LoraConfig.from_env(env).adapters, ptuning_path=env.get("PTUNING_PATH") or None)
    return config, EngineConfig.from_env(env), ParallelConfig.from_env(env)


def _placed(name_or_path, model_config: Optional[ModelConfig],
            device) -> Tuple[ModelConfig, torch.device, torch.dtype]:
    """The resolved checkpoint and tokenizer directories, the device and the compute dtype."""
    if isinstance(name_or_path, ModelConfig):
        model_config, name_or_path = name_or_path, name_or_path.ckpt_path
    config = model_config or ModelConfig()
    ckpt_dir = resolve_model_dir(name_or_path or config.ckpt_path or None)
    tokenizer_dir = resolve_tokenizer_dir(config.tokenizer_path) if config.tokenizer_path else ckpt_dir
    config = replace(config, ckpt_path=ckpt_dir, tokenizer_path=tokenizer_dir)
    cuda = torch.cuda.is_available()
    placement = choose_placement(cuda_available=cuda, hf_config=_read_json(os.path.join(ckpt_dir, "config.json")),
                                 device=device, maga_device=os.environ.get("MAGA_DEVICE"),
                                 act_type=config.act_type, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    logger.info("placement: %s", placement.reason)
    return config, placement.device, placement.dtype


def load_model_weights(ckpt_path: str, model_type: str, dtype: torch.dtype, device: torch.device,
                       tp: Optional[TensorParallel] = None, load_threads: int = 1,
                       weight_quant: str = "", lora: Optional[LoraConfig] = None) -> DecoderModel:
    """The model family's class built on `device` with the checkpoint's weights (where the engine
    core lives: this process in-process, the core's process otherwise); under tensor parallelism,
    this rank's shard of them."""
    hf_config = _read_json(os.path.join(ckpt_path, "config.json"))
    model_cls = resolve_model_class(model_type, hf_config)
    model = model_cls(model_cls.arch_from_hf_config(hf_config), dtype, device, tp)
    model.load_threads = load_threads
    model.weight_quant = weight_quant
    logger.info("loading %s (%s) from %s as %s on %s%s", model_cls.__name__, hf_config.get("model_type"),
                ckpt_path, dtype, device, f", {model.tp}" if tp is not None else "")
    tensors = iter_checkpoint_tensors(ckpt_path, lazy=model.tp.size > 1)
    if lora is not None and lora.merge:  # LORA_MERGE=1: the one adapter goes into the weights as they load
        name, path = next(iter(lora.adapters.items()))
        tensors = merged_tensors(tensors, read_peft_adapter(name, path, lora.max_rank))
    model.load_weights(tensors)
    return model


def tokenize_task_prompts(tokenizer) -> dict:
    """MULTI_TASK_PROMPT(_STR)'s prompts as token ids (task_id -> ids)."""
    return {task_id: tokenizer.encode(text) for task_id, text in task_prompts_from_env().items()}


def lora_config_of(config: ModelConfig) -> LoraConfig:
    """ModelConfig.lora_infos (or LORA_INFO) with MAX_LORA_MODEL_SIZE and LORA_MERGE from the environment."""
    return LoraConfig.from_env(os.environ, config.lora_infos)


def _check_quantization(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Quantized weights that cannot run here stop start-up, naming the setting."""
    if config.weight_type != WEIGHT_TYPE.FP8:
        return
    reason = fp8_supported(device)
    if reason is not None and not fp8_emulated():
        raise ValueError(f"WEIGHT_TYPE=FP8: {reason}; use WEIGHT_TYPE=INT8 (weight-only, any device) instead, or "
                         "MAGA_FP8_EMULATION=1 to emulate FP8's rounding slowly (quality checks only)")
    if reason is None and dtype != torch.bfloat16:
        raise ValueError(f"WEIGHT_TYPE=FP8 computes in bf16 (its scaled GEMM writes bf16), not "
                         f"{str(dtype).replace('torch.', '')}: set ACT_TYPE=bf16 or leave it unset")


def _check_parallel(parallel: ParallelConfig, arch, device: torch.device, engine_config: EngineConfig) -> None:
    if not parallel.enabled:
        return
    if not engine_config.engine_process:
        raise ValueError(f"TP_SIZE ({parallel.tp_size}) > 1 needs the engine core in its own process: "
                         "unset ENGINE_PROCESS=0")
    parallel.check(torch.cuda.device_count() if device.type == "cuda" else None)
    parallel.check_model(arch.num_heads, arch.num_kv_heads)


def _model_plan(config: ModelConfig):
    """(config with its max_seq_len settled, config.json, the family class, the model's arch)."""
    hf_config = _read_json(os.path.join(config.ckpt_path, "config.json"))
    if not hf_config and not config.model_type:  # with a model_type, the family's defaults (GLM-130B's SAT release)
        raise ValueError(f"ckpt_path: {config.ckpt_path} has no config.json (or give MODEL_TYPE)")
    model_cls = resolve_model_class(config.model_type, hf_config)
    arch = model_cls.arch_from_hf_config(hf_config)
    if config.max_seq_len == 0:
        config = replace(config, max_seq_len=arch.context_length)
    return config, hf_config, model_cls, arch


def _core_launch(config: ModelConfig, engine_config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 parallel: ParallelConfig, eos: List[int]) -> CoreLaunch:
    return CoreLaunch(ckpt_path=config.ckpt_path, model_type=config.model_type,
                      dtype=str(dtype).replace("torch.", ""), device=str(device), engine_config=engine_config,
                      max_seq_len=config.max_seq_len, block_size=config.seq_size_per_block, eos_token_ids=eos,
                      log_level=logging.getLogger().getEffectiveLevel(),
                      parallel=parallel.with_free_port() if parallel.enabled and parallel.machines == 1 else parallel,
                      weight_quant=config.weight_type.quantization, lora=lora_config_of(config),
                      ptuning_dir=find_ptuning_dir(config.ptuning_path, config.ckpt_path))


def _load(config: ModelConfig, engine_config: Optional[EngineConfig], device: torch.device,
          dtype: torch.dtype, parallel: ParallelConfig) -> AsyncModel:
    """Everything the front end needs (config, tokenizer, limits) is read here; the weights are
    loaded here in-process, or by the engine-core process it starts."""
    config, hf_config, model_cls, arch = _model_plan(config)
    engine_config = engine_config or EngineConfig.from_env()
    eos = _configured_eos_ids(config.ckpt_path, hf_config)
    _check_parallel(parallel, arch, device, engine_config)
    _check_quantization(config, device, dtype)
    if parallel.enabled and lora_config_of(config).merge:
        raise ValueError("LORA_MERGE=1 under tensor parallelism (TP_SIZE > 1) is not supported: serve the adapter "
                         "unmerged")
    if not engine_config.engine_process:
        tokenizer = load_tokenizer(config.tokenizer_path, config.ckpt_path)
        eos = eos if eos is not None else _tokenizer_eos_ids(tokenizer)
        model = load_model_weights(config.ckpt_path, config.model_type, dtype, device,
                                   weight_quant=config.weight_type.quantization, lora=lora_config_of(config))
        return AsyncModel(model, tokenizer, config, hf_config, eos, engine_config)
    tokenizer = None
    if eos is None:  # only the tokenizer knows: read it before the core needs it
        tokenizer = load_tokenizer(config.tokenizer_path, config.ckpt_path)
        eos = _tokenizer_eos_ids(tokenizer)
    launch = _core_launch(config, engine_config, device, dtype, parallel, eos)
    starting = StartingCore(launch)  # the weights load there while the tokenizer loads here
    try:
        tokenizer = tokenizer or load_tokenizer(config.tokenizer_path, config.ckpt_path)
    except BaseException:
        starting.kill()
        raise
    engine = starting.connect(tokenizer, functools.partial(model_cls.layout_for, arch), engine_config.step_timeout_s)
    engine.set_task_prompts(tokenize_task_prompts(tokenizer))
    return AsyncModel(None, tokenizer, config, hf_config, eos, engine_config, arch=arch, engine=engine)
