"""Tensor-parallel settings as rtp-llm names them, read once at the edge and checked before anything
loads (docs/MultiGPU.md).

    TP_SIZE                  ranks that split every layer (default WORLD_SIZE, else 1)
    WORLD_SIZE               processes in all, over every machine (default TP_SIZE)
    WORLD_RANK               global rank of this machine's first process (machine k of equal
                             machines: k x LOCAL_WORLD_SIZE); 0 on the machine with the HTTP server
    LOCAL_WORLD_SIZE         processes on this machine (default WORLD_SIZE)
    TP_SPLIT_EMB_AND_LMHEAD  split the embedding and the LM head over the vocabulary (default on)
    LOAD_CKPT_NUM_PROCESS    threads that assemble layers while loading (default 1)
    MASTER_ADDR, MASTER_PORT torch.distributed's rendezvous (default 127.0.0.1 and a free port on a
                             single machine; every machine must give the same on several)
    TP_COLLECTIVE_TIMEOUT_S  a collective that waits longer than this fails the engine (default 60)

torchrun works too: its RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE make every process one
rank (rank 0 serves HTTP, the others run workers), and nothing else is spawned.
"""
from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from maga_transformer.config.engine_config import env_bool, env_int


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    world_size: int = 1
    world_rank: int = 0  # this machine's first global rank (torchrun: this process's rank)
    local_world_size: int = 1
    split_embeddings: bool = True
    load_threads: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: pick a free one (single machine only)
    collective_timeout_s: float = 60.0
    torchrun: bool = False  # every process is already one rank; spawn nothing

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def machines(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def serves_http(self) -> bool:
        """The machine (torchrun: the process) whose ranks start at 0 runs the front end."""
        return self.world_rank == 0

    def with_free_port(self) -> "ParallelConfig":
        if self.master_port:
            return self
        with socket.socket() as probe:
            probe.bind((self.master_addr, 0))
            port = probe.getsockname()[1]
        return dataclasses.replace(self, master_port=port)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ParallelConfig":
        if env.get("DISTRIBUTE_CONFIG_FILE"):
            raise ValueError("DISTRIBUTE_CONFIG_FILE is not supported yet: give every machine WORLD_SIZE, "
                             "WORLD_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (docs/MultiGPU.md)")
        torchrun = bool(env.get("TORCHELASTIC_RUN_ID")) or ("LOCAL_RANK" in env and "RANK" in env)
        tp = env_int(env, "TP_SIZE", None)
        world = env_int(env, "WORLD_SIZE", None)
        world = world if world is not None else (tp or 1)
        tp = tp if tp is not None else world
        if torchrun:
            rank, local = env_int(env, "RANK", 0), 1
        else:
            rank = env_int(env, "WORLD_RANK", 0)
            local = env_int(env, "LOCAL_WORLD_SIZE", None) or world
        config = cls(tp_size=tp, world_size=world, world_rank=rank, local_world_size=local,
                     split_embeddings=env_bool(env, "TP_SPLIT_EMB_AND_LMHEAD", True),
                     load_threads=env_int(env, "LOAD_CKPT_NUM_PROCESS", 1),
                     master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                     master_port=env_int(env, "MASTER_PORT", 0),
                     collective_timeout_s=float(env_int(env, "TP_COLLECTIVE_TIMEOUT_S", 60)),
                     torchrun=torchrun)
        config.check()
        return config

    def check(self, num_gpus: Optional[int] = None) -> None:
        """Combinations that cannot run, refused with the variable to change."""
        for name, value in (("TP_SIZE", self.tp_size), ("WORLD_SIZE", self.world_size),
                            ("LOCAL_WORLD_SIZE", self.local_world_size), ("LOAD_CKPT_NUM_PROCESS", self.load_threads)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.world_size % self.tp_size:
            raise ValueError(f"WORLD_SIZE ({self.world_size}) must be a multiple of TP_SIZE ({self.tp_size})")
        if self.world_size != self.tp_size:
            raise ValueError(f"WORLD_SIZE ({self.world_size}) is more than TP_SIZE ({self.tp_size}): pipeline and "
                             "data parallelism are not supported; set WORLD_SIZE = TP_SIZE")
        if not self.torchrun and self.world_size % self.local_world_size:
            raise ValueError(f"LOCAL_WORLD_SIZE ({self.local_world_size}) must divide WORLD_SIZE ({self.world_size})")
        if not 0 <= self.world_rank < self.world_size:
            raise ValueError(f"WORLD_RANK ({self.world_rank}) must be in [0, WORLD_SIZE = {self.world_size})")
        if not self.torchrun and self.world_rank % self.local_world_size:
            raise ValueError(f"WORLD_RANK ({self.world_rank}) must be a multiple of LOCAL_WORLD_SIZE "
                             f"({self.local_world_size}): it is the global rank of this machine's first process")
        if self.machines > 1 and not self.master_port:
            raise ValueError("MASTER_PORT must be set (the same on every machine) when WORLD_SIZE spans machines")
        if num_gpus is not None and self.local_world_size > num_gpus:
            raise ValueError(f"LOCAL_WORLD_SIZE ({self.local_world_size}) asks for more ranks on this machine than "
                             f"it has GPUs ({num_gpus})")

    def check_model(self, num_heads: int, num_kv_heads: int, intermediate_sizes: tuple = ()) -> None:
        """Shapes the split needs: whole query heads per rank; KV heads split evenly or replicated."""
        tp = self.tp_size
        if num_heads % tp:
            raise ValueError(f"TP_SIZE ({tp}) must divide the model's {num_heads} query heads")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"TP_SIZE ({tp}) and the model's {num_kv_heads} KV heads: one must divide the other")
        for size in intermediate_sizes:
            if size % tp:
                raise ValueError(f"TP_SIZE ({tp}) must divide the model's MLP width ({size})")
