"""The MLflow pyfunc model that serves a chat policy (SFT or PPO): user messages in, assistant replies out.

Logged as "models from code" with `model/` as a code path, so loading needs only torch and tokenizers; the same
model answers `mlflow.pyfunc.load_model(...).predict(...)` and `mlflow models serve` (README: "Serving the chat
model"). Each prompt is rendered in the chat format the policy was trained on ([user] prompt [end] [assistant]) and
the reply runs to the policy's <|end|>.

Request: a list of prompt strings (served: {"inputs": [...]}), or a DataFrame with a `prompt` column (served:
"dataframe_split"). Params, declared in the logged signature so a served request's "params" are honoured (MLflow
ignores undeclared ones): max_new_tokens (capped by what the context leaves), temperature (0 = greedy), top_p,
seed, system. Response: one reply string per prompt. A request the model cannot answer (a prompt that fills the
context, a negative temperature, ...) raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server
returns as HTTP 400 with our message; any other exception would reach a client only as a generic error.
"""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
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
        from model.errors import InstructflowError

        if hasattr(model_input, "columns"):  # a DataFrame: MLflow's schema enforcement turns inputs into one
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column].tolist()]
        else:
            prompts = [str(p) for p in model_input]
        try:
            return self._replies(prompts, {**DEFAULT_PARAMS, **(params or {})})
        except InstructflowError as e:  # the caller's mistake: served, it becomes an HTTP 400 carrying this text
            raise MlflowException.invalid_parameter_value(str(e)) from e

    def _replies(self, prompts: list[str], settings: dict) -> list[str]:
        from model.errors import InstructflowError
        from model.sft import generate_responses, render

        if not prompts:
            raise InstructflowError("no prompts given: send at least one message")
        system = settings["system"] or None
        longest = max(len(render(self.tokenizer, p, system=system).ids) for p in prompts)
        context = self.model.config.block_size
        if longest >= context:
            raise InstructflowError(f"a prompt takes {longest} tokens (system message included) and the model's "
                                    f"context holds {context}, leaving no room for a reply; shorten it")
        temperature = float(settings["temperature"])
        return generate_responses(self.model, self.tokenizer, prompts, system=system,
                                  max_new_tokens=min(int(settings["max_new_tokens"]), context - longest),
                                  temperature=temperature, top_p=float(settings["top_p"]) if temperature else None,
                                  seed=int(settings["seed"]))


mlflow.models.set_model(ChatPolicy())
