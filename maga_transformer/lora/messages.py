"""What crosses between the front end and the engine core about adapters (engine/messages.py's
channel carries them: ("lora", LoraCommand) in, CoreStepOutput.lora_results out)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class LoraCommand:
    """kind "set": `adapters` is the full wanted set (rtp-llm's POST /update): names missing from it
    are unloaded, new names loaded, a known name with another path refused. "load": add these
    (vLLM's /v1/load_lora_adapter). "unload": remove these names (paths ignored)."""

    command_id: int
    kind: str
    adapters: Dict[str, str] = field(default_factory=dict)


@dataclass
class LoraUpdateResult:
    command_id: int
    adapters: Dict[str, str]  # the served set after the command (unchanged when it failed)
    error: Optional[str] = None
    status: int = 200  # the HTTP status a server answers with: 400 bad adapter / request, 404 unknown name
    loaded: List[str] = field(default_factory=list)
    unloaded: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None
