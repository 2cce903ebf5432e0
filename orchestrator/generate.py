"""``orchestrator generate``: continue a prompt with a run's model, to see what it learned.

Our own model runs (no transformers needed), in fp32 with standard attention on CPU or GPU.
Greedy by default; ``temperature > 0`` samples with a seeded generator, so a seed repeats.
The context is the last ``max_seq_len`` tokens: the model never saw longer sequences.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from orchestrator import trained
from orchestrator.errors import UsageError
from trainer.attention import standard_attention
from trainer.model import Transformer


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to this process")
    return torch.device(name)


@torch.no_grad()
def continue_ids(model: Transformer, ids: list[int], *, max_new_tokens: int, temperature: float,
                 generator: torch.Generator, stop_id: int, vocab_size: int) -> list[int]:
    """New token ids after ``ids``, up to ``max_new_tokens`` or ``stop_id``; only ids below
    ``vocab_size`` (the tokenizer's), never a padded row of the model's vocab."""
    device = next(model.parameters()).device
    out = list(ids)
    for _ in range(max_new_tokens):
        ctx = torch.tensor([out[-model.args.max_seq_len:]], device=device)
        logits = model(ctx)[0, -1, :vocab_size].float()  # (vocab,)
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if nxt == stop_id:
            break
        out.append(nxt)
    return out[len(ids):]


def generate(run_dir: Path, prompt: str, *, variant: Optional[str] = None, step: Optional[int] = None,
             max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0, device: str = "auto") -> str:
    """The prompt and its continuation, decoded together (a SentencePiece decode of the new
    tokens alone would drop the space they start with)."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not (0 <= temperature < math.inf):  # nan compares false: it would sample from nan weights
        raise UsageError(f"--temperature {temperature:g}: must be 0 (greedy) or a finite positive number")
    dev = device_for(device)
    src = trained.load(run_dir, variant, step)
    model = Transformer(src.args, standard_attention)
    model.load_state_dict(src.state)
    model.to(dev).eval()
    tok = src.tokenizer
    # Every training document follows an end-of-text token, so the prompt does too.
    ids = [tok.eos_id] + tok.encode(prompt)
    new = continue_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                       generator=torch.Generator().manual_seed(seed), stop_id=tok.eos_id,
                       vocab_size=tok.vocab_size)
    return tok.decode(ids[1:] + new)
