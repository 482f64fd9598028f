"""Sample text from a saved model.

    python -m gpt2exp.generate outputs/<date>/<time> prompt="ROMEO:" max_new_tokens=200 temperature=0.8 top_k=50
    python -m gpt2exp.generate outputs/<date>/<time>/checkpoints/step_00000300 num_samples=3 seed=7

A run dir uses its newest checkpoint that verifies; a checkpoint dir is used as it is (after
verification). Arguments are key=value: prompt, max_new_tokens, temperature, top_k, num_samples,
seed, device.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gpt2exp.errors import UserError, fail

DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "max_new_tokens": 200,
    "temperature": 0.8,
    "top_k": 50,
    "num_samples": 1,
    "seed": 0,
    "device": "cpu",
}


def sample_texts(
    model,
    tokenizer,
    prompt: str,
    count: int,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> list[str]:
    """`count` continuations of `prompt`; uses a forked RNG, so training randomness is untouched."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    ids = [tokenizer.eos_token_id] + ids  # generation starts as after a document boundary
    block = model.config.n_positions
    was_training = model.training
    model.eval()
    texts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for _ in range(count):
            tokens = torch.tensor([ids], device=device)
            for _ in range(max_new_tokens):
                logits = model(input_ids=tokens[:, -block:], use_cache=False).logits[:, -1, :].float()
                if temperature <= 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
                tokens = torch.cat([tokens, next_id], dim=1)
            texts.append(tokenizer.decode(tokens[0, 1:].tolist(), skip_special_tokens=False))
    model.train(was_training)
    return texts


def parse_args(argv: list[str]) -> tuple[Path, dict[str, Any]]:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    options = dict(DEFAULTS)
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            raise UserError(f"unknown argument {arg!r}; use key=value with key in {sorted(DEFAULTS)}")
        try:
            options[key] = type(DEFAULTS[key])(value) if key not in ("prompt", "device") else value
        except ValueError:
            raise UserError(f"{key}={value!r} is not a valid {type(DEFAULTS[key]).__name__}") from None
    return Path(argv[0]), options


def find_checkpoint(path: Path) -> Path:
    from gpt2exp.checkpoint import find_verified, is_checkpoint_dir

    if not path.exists():
        raise UserError(f"path does not exist: {path}; pass a run dir or a checkpoint dir")
    if is_checkpoint_dir(path):
        return find_verified(path.parent, target=path)
    if not (path / "checkpoints").is_dir():
        raise UserError(f"{path} is neither a run dir with checkpoints nor a checkpoint dir")
    return find_verified(path / "checkpoints")


def main(argv: list[str] | None = None) -> None:
    try:
        path, options = parse_args(sys.argv[1:] if argv is None else argv)
        checkpoint = find_checkpoint(path)
        from transformers import AutoTokenizer, GPT2LMHeadModel

        from gpt2exp.model import quiet_transformers

        quiet_transformers()
        model = GPT2LMHeadModel.from_pretrained(checkpoint).to(options["device"])
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except UserError as exc:
        fail(str(exc))
    texts = sample_texts(
        model,
        tokenizer,
        prompt=options["prompt"],
        count=options["num_samples"],
        max_new_tokens=options["max_new_tokens"],
        temperature=options["temperature"],
        top_k=options["top_k"],
        seed=options["seed"],
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"=== sample {i + 1} ===")
        print(text)


if __name__ == "__main__":
    main()
