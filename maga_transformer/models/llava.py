"""LLaVA v1.5 (liuhaotian/llava-v1.5-7b / -13b, original layout: LlavaLlamaForCausalLM) as its language
model, a LLaMA. The checkpoint holds LLaMA's tensors under LLaMA's names plus the multimodal projector
(model.mm_projector.*) and sometimes the vision tower; config.json is a LLaMA config with mm_* keys.
Images need the vision tower and projector (roadmap: multimodal), so until then those tensors are not
loaded and requests carrying images are refused; text prompts run exactly as on the LLaMA inside.

transformers' converted layout (llava-hf: LlavaForConditionalGeneration, a nested text_config) is a
different checkpoint format: it is refused with a clear error rather than guessed at.
"""
from __future__ import annotations

import logging

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.llama import LlamaModel
from maga_transformer.models.registry import register_model

logger = logging.getLogger(__name__)


class LlavaModel(LlamaModel):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        if "text_config" in hf:
            raise ValueError("LLaVA: transformers' converted layout (text_config, LlavaForConditionalGeneration) "
                             "is not supported; use the original checkpoint (LlavaLlamaForCausalLM, e.g. "
                             "liuhaotian/llava-v1.5-7b)")
        if hf.get("mm_vision_tower") or hf.get("mm_projector_type"):
            logger.warning("LLaVA: serving the language model only; the vision tower and projector are not "
                           "loaded and requests with images are refused (multimodal is a later feature)")
        return super().arch_from_hf_config(hf)


register_model(["llava"], LlavaModel, architectures=["LlavaLlamaForCausalLM"])
