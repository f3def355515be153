"""Chat with a trained policy in the terminal: the champion PPO policy, else the newest SFT model, token by token.

The model is found in the MLflow registry (`models:/policy@champion`, falling back to `models:/sft/latest`) or given
as a checkpoint directory; each turn is rendered in the chat format the policy was trained on and the reply is
printed as it is generated, up to the policy's <|end|>. Turns are independent (the tiny models have a short context).
"""

from __future__ import annotations

import sys

from model.errors import InstructflowError


def resolve_chat_model(model: str | None, tokenizer: str | None) -> tuple[str, str, str]:
    """(checkpoint dir, tokenizer file, what it is) for `model`, or the champion policy / latest SFT model."""
    from tasks import tracking
    from tasks.stages import resolve_model

    if model:
        checkpoint, tok = resolve_model(model, tokenizer)
        return checkpoint, tok, model
    for uri in ("models:/policy@champion", "models:/sft/latest"):
        try:
            checkpoint, tok = tracking.registered_checkpoint(uri)
        except InstructflowError:
            continue
        return str(checkpoint), tokenizer or str(tok), uri
    raise InstructflowError("no trained policy to chat with: neither models:/policy@champion nor models:/sft/latest "
                            "is registered; run `make demo` (or the sft and rlhf flows) first, or pass --model")


def reply_stream(model, tokenizer, message: str, *, temperature: float, max_new_tokens: int, seed: int | None = None):
    """Yield the reply's text piece by piece as tokens are sampled (decoded incrementally, whole characters only)."""
    import torch

    from model.generate import sample_next
    from model.sft import chat_tokens, render

    chat = chat_tokens(tokenizer)
    ids = render(tokenizer, message).ids
    room = model.config.block_size - len(ids)
    if room < 1:
        raise InstructflowError(f"the message takes {len(ids)} tokens, the model's whole context; shorten it")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.new_cache(1, len(ids) + min(max_new_tokens, room))
    step = torch.tensor([ids])
    reply: list[int] = []
    shown = ""
    with torch.no_grad():
        for _ in range(min(max_new_tokens, room)):
            hidden = model.hidden_states(step, cache=cache)
            token = int(sample_next(model.lm_head(hidden[:, -1]), temperature, None, 0.95 if temperature else None,
                                    generator)[0])
            if token in (chat.end, chat.eot):
                break
            reply.append(token)
            text = tokenizer.decode(reply)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
            step = torch.tensor([[token]])


def chat_session(model: str | None, tokenizer: str | None, *, temperature: float = 0.7, max_new_tokens: int = 64,
                 message: str | None = None) -> None:
    from model.checkpoint import load_checkpoint
    from model.tokenizer import Tokenizer

    checkpoint, tok_path, source = resolve_chat_model(model, tokenizer)
    policy, _ = load_checkpoint(checkpoint)
    policy.eval()
    tok = Tokenizer.load(tok_path)
    messages = [message] if message is not None else None
    if messages is None:
        print(f"chatting with {source} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        if messages is not None:
            if not messages:
                return
            text = messages.pop()
        else:
            try:
                text = input("you> ")
            except EOFError:
                return
            if not text.strip():
                return
        print("model> ", end="", flush=True)
        for piece in reply_stream(policy, tok, text, temperature=temperature, max_new_tokens=max_new_tokens):
            print(piece, end="", flush=True)
        print()
