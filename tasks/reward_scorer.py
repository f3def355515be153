"""The MLflow pyfunc model that serves a reward model: (prompt, response) pairs in, normalised rewards out.

Logged as "models from code" with `model/` as a code path. Request: a DataFrame (or list of dicts) with `prompt`
and `response` columns; response: one float per row (0 is the mean reward of the reference samples, 1 their std).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class RewardScorer(PythonModel):
    def load_context(self, context) -> None:
        from model.reward import load_reward_model
        from model.tokenizer import Tokenizer

        self.model = load_reward_model(context.artifacts["reward_model"])
        self.tokenizer = Tokenizer.load(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params: dict | None = None) -> list[float]:
        from model.reward import score
        from model.sft import render

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        sequences = [render(self.tokenizer, str(r["prompt"]), str(r["response"])).ids for r in rows]
        return score(self.model, sequences, pad=self.tokenizer.eot_id).tolist()


mlflow.models.set_model(RewardScorer())
