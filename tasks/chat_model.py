"""The MLflow pyfunc model that serves a chat policy (SFT or PPO): user messages in, assistant replies out.

Logged as "models from code" with `model/` as a code path, so loading needs only torch and tokenizers. Each prompt
is rendered in the chat format the policy was trained on ([user] prompt [end] [assistant]) and the reply runs to
the policy's <|end|>. Request: a list of prompt strings (or a DataFrame with a `prompt` column); optional params
max_new_tokens, temperature (0 = greedy), top_p, seed, system. Response: one reply string per prompt.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULT_PARAMS = {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.95, "seed": 0, "system": ""}


class ChatPolicy(PythonModel):
    def load_context(self, context) -> None:
        from model.checkpoint import load_checkpoint
        from model.tokenizer import Tokenizer

        self.model, _ = load_checkpoint(context.artifacts["checkpoint"])
        self.model.eval()
        self.tokenizer = Tokenizer.load(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from model.sft import generate_responses, render

        settings = {**DEFAULT_PARAMS, **(params or {})}
        if hasattr(model_input, "columns"):  # a DataFrame: MLflow's serving turns JSON inputs into one
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column].tolist()]
        else:
            prompts = [str(p) for p in model_input]
        system = settings["system"] or None
        longest = max(len(render(self.tokenizer, p, system=system).ids) for p in prompts)
        room = self.model.config.block_size - longest
        if room < 1:
            raise ValueError(f"a prompt takes {longest} tokens, the model's whole context; shorten it")
        temperature = float(settings["temperature"])
        return generate_responses(self.model, self.tokenizer, prompts, system=system,
                                  max_new_tokens=max(1, min(int(settings["max_new_tokens"]), room)),
                                  temperature=temperature, top_p=float(settings["top_p"]) if temperature else None,
                                  seed=int(settings["seed"]))


mlflow.models.set_model(ChatPolicy())
