"""Model families. Importing this package registers every family with the registry."""
from maga_transformer.models.registry import (register_model, resolve_model_class, supported_architectures,
                                              supported_model_types)
from maga_transformer.models import llama  # noqa: F401  (registers the LLaMA family)
from maga_transformer.models import qwen  # noqa: F401  (Qwen2, Qwen2.5, Qwen3)
from maga_transformer.models import mixtral  # noqa: F401  (Mixtral MoE)
from maga_transformer.models import qwen_moe  # noqa: F401  (Qwen2-MoE, Qwen3-MoE)
from maga_transformer.models import baichuan  # noqa: F401  (Baichuan-7B, Baichuan2-7B)
from maga_transformer.models import qwen_v1  # noqa: F401  (Qwen v1: QWenLMHeadModel)
from maga_transformer.models import chatglm  # noqa: F401  (ChatGLM2, ChatGLM3; ChatGLM-6B v1 via glm)
from maga_transformer.models import glm  # noqa: F401  (GLM v1: ChatGLM-6B, GLM-130B)

__all__ = ["register_model", "resolve_model_class", "supported_architectures", "supported_model_types"]
from maga_transformer.models import gpt_neox  # noqa: F401,E402  (GPT-NeoX)
from maga_transformer.models import phi  # noqa: F401,E402  (Phi-1/1.5/2)
from maga_transformer.models import gpt_bigcode  # noqa: F401,E402  (StarCoder, WizardCoder)
from maga_transformer.models import falcon  # noqa: F401,E402  (Falcon, RW)
from maga_transformer.models import bloom  # noqa: F401,E402  (BLOOM, SGPT-BLOOM)
from maga_transformer.models import mpt  # noqa: F401,E402  (MPT)
from maga_transformer.models import baichuan_13b  # noqa: F401,E402  (Baichuan-13B, Baichuan2-13B: ALiBi)
from maga_transformer.models import llava  # noqa: F401,E402  (LLaVA v1.5: its LLaMA, text only)
