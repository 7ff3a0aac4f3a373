"""The seed's example: a Pipeline over the embedded default model (SmolLM2-135M-Instruct).

    python3 example/test.py                      # embedded model
    CHECKPOINT_PATH=/path/to/hf_dir python3 example/test.py
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maga_transformer.model_factory import ModelFactory  # noqa: E402
from maga_transformer.pipeline import Pipeline  # noqa: E402


def main() -> None:
    logging.basicConfig(level=os.environ.get("PY_LOG_LEVEL", "WARNING"))
    model = ModelFactory.from_huggingface(os.environ.get("CHECKPOINT_PATH") or None)
    pipeline = Pipeline(model, model.tokenizer)
    questions = ["What is the capital of France? Answer briefly.", "Write a haiku about the sea."]
    prompts = [pipeline.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    final = None
    for res in pipeline(prompts, max_new_tokens=64, top_k=1):
        final = res
    for question, answer in zip(questions, final.batch_response):
        print(f"Q: {question}\nA: {answer}\n")
    pipeline.stop()


if __name__ == "__main__":
    main()
