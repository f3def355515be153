"""The MLflow pyfunc model that serves a checkpoint: prompts in, completions out (logged as "models from code").

MLflow runs this file when it loads the model; `model/` travels with it as a code path, so loading needs
only torch and tokenizers. Request: a list of prompt strings; optional params max_new_tokens,
temperature, top_k, top_p, seed. Response: one completion string per prompt.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULT_PARAMS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "seed": 0}


class TextGenerator(PythonModel):
    def load_context(self, context) -> None:
        from model.checkpoint import load_checkpoint
        from model.tokenizer import Tokenizer

        self.model, _ = load_checkpoint(context.artifacts["checkpoint"])
        self.tokenizer = Tokenizer.load(context.artifacts["tokenizer"])

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from model.generate import generate

        settings = {**DEFAULT_PARAMS, **(params or {})}
        prompts = list(model_input)
        eot = self.tokenizer.eot_id
        encoded = [self.tokenizer.encode(p) or [eot] for p in prompts]
        room = self.model.config.block_size - max(len(e) for e in encoded)
        out = generate(
            self.model, encoded, max(1, min(int(settings["max_new_tokens"]), room)),
            temperature=float(settings["temperature"]), top_k=int(settings["top_k"]) or None,
            top_p=float(settings["top_p"]), seed=int(settings["seed"]), stop_tokens=[eot], pad_token=eot,
        )
        return [self.tokenizer.decode([t for t in tokens if t != eot]) for tokens in out]


mlflow.models.set_model(TextGenerator())
