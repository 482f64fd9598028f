"""Sample text from a saved model.

    python -m gpt2exp.generate outputs/<date>/<time> --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50
    python -m gpt2exp.generate outputs/<date>/<time>/checkpoints/step_00000300 --num-samples 3 --seed 7
    python -m gpt2exp.generate outputs/<date>/<time> --prompt "JULIET:" --temperature 0   # greedy

A run dir uses its newest checkpoint that verifies; a checkpoint dir is used as it is (after
verification). Generation starts as after a document boundary, then the prompt; the same seed gives
the same text. --temperature 0 is greedy; --top-k 0 samples from the whole vocabulary. Ranges:
--max-new-tokens >= 1, --temperature >= 0, --top-k >= 0, --num-samples >= 1. Exit code 2 for bad input.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gpt2exp import cli
from gpt2exp.errors import UserError, fail

PROG = "python -m gpt2exp.generate"


# -- sampling ------------------------------------------------------------------------------------


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
    """`count` continuations of `prompt` (each with the prompt in front), `max_new_tokens` tokens each.

    Generation starts as after a document boundary (an eos token before the prompt). The random
    draws come from a private generator seeded with `seed` (a fork of no one's RNG state), so the
    same seed gives the same texts and the caller's (training's) random state is untouched. Sample
    i does not depend on `count`. Greedy when temperature <= 0; else top-k (None or 0: all tokens)
    then multinomial.
    """
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    ids = [tokenizer.eos_token_id, *ids]  # generation starts as after a document boundary
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = [
                sample_ids(model, ids, max_new_tokens, temperature, top_k, generator, vocab_size=len(tokenizer))
                for _ in range(count)
            ]
    finally:
        model.train(was_training)
    return [tokenizer.decode(out[1:], skip_special_tokens=False) for out in outputs]


def sample_ids(
    model,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: Any = None,
    vocab_size: int | None = None,
) -> list[int]:
    """`ids` followed by `max_new_tokens` sampled tokens, using the model's KV cache.

    Only ids below `vocab_size` (the tokenizer's; None: every logit) are drawn: a model whose
    embedding is padded (model.vocab_multiple) has rows no token owns.

    The context (prompt included) is fed once; after that each step feeds only the newest token,
    so N new tokens cost N one-token forwards rather than N full windows. Call under no_grad.
    """
    import torch

    if not ids:
        raise ValueError("sample_ids needs at least one token to start from")
    device = next(model.parameters()).device
    block = model.config.n_positions
    half = max(1, block // 2)
    tokens = torch.empty((1, len(ids) + max_new_tokens), dtype=torch.long, device=device)
    tokens[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    length = len(ids)
    cache, cached = None, 0  # the KV cache and how many positions it holds
    pending = tokens[:, max(0, length - block) : length]  # tokens to feed next: the (cropped) prompt
    for _ in range(max_new_tokens):
        if cached + pending.size(1) > block:
            # The window is full: drop the cache and re-fill it from the last half of the window, then go on
            # one token at a time. The no-cache loop this replaces re-ran the last n_positions tokens every
            # step (a sliding window: always a full context, but a full forward per token); here the context
            # shrinks to n_positions // 2 after each refill and grows back, costing one refill per half window.
            cache, cached, pending = None, 0, tokens[:, length - half : length]
        # the cache goes in positionally: transformers 4.x calls it `past_key_values`, 5.x `cache`
        out = model(pending, cache, use_cache=True)
        cache, cached = _cache_of(out), cached + pending.size(1)
        tokens[:, length] = next_token(out.logits[:, -1, :vocab_size].float(), temperature, top_k, generator)
        length += 1
        pending = tokens[:, length - 1 : length]
    return tokens[0].tolist()


def next_token(logits, temperature: float, top_k: int | None, generator: Any = None):
    """One token id per row of `logits` (batch, vocab): argmax if temperature is 0 (or as good as 0 in the
    logits' dtype), else top-k sampling."""
    import torch

    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or one that is 0 in the logits' dtype: greedy
        return logits.argmax(dim=-1)
    # shifted so the largest is 0 first: a tiny temperature then gives -inf, never inf - inf (NaN)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)[:, 0]


def _cache_of(out: Any) -> Any:
    # transformers 5.x returns `cache` (its `past_key_values` is a deprecated alias that logs a warning)
    return out["cache"] if "cache" in out else out["past_key_values"]


# -- the command line ----------------------------------------------------------------------------


def build_parser() -> cli.ArgumentParser:
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("path", metavar="PATH", help="a run dir (its newest good checkpoint) or a checkpoint dir")
    parser.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: none)")
    parser.add_argument(
        "--max-new-tokens", type=cli.positive_int, default=200, metavar="N", help="tokens per sample, >= 1 (200)"
    )
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T", help=">= 0; 0: greedy (0.8)")
    parser.add_argument(
        "--top-k", type=cli.non_negative_int, default=50, metavar="K", help="sample among the K likeliest; 0: all (50)"
    )
    parser.add_argument("--num-samples", type=cli.positive_int, default=1, metavar="N", help="how many samples (1)")
    parser.add_argument(
        "--seed", type=cli.seed, default=0, metavar="S", help="the same seed gives the same text, [0, 2**32) (0)"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (cpu)")
    return parser


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint dir `path` names, or a run dir's newest checkpoint that verifies (UserError if none)."""
    from gpt2exp.checkpoint import find_verified, list_checkpoints
    from gpt2exp.rundir import existing_checkpoints_root
    from gpt2exp.targets import resolve_target

    target = resolve_target(path)
    if target.checkpoint is not None:
        return find_verified(target.checkpoint.parent, target=target.checkpoint)
    assert target.run_dir is not None
    root = existing_checkpoints_root(target.run_dir)  # <run dir>/checkpoints, or where checkpoint.dir put them
    if not list_checkpoints(root):
        raise UserError(f"run dir {path} has no checkpoints yet; nothing to sample from")
    return find_verified(root)


def load(checkpoint: Path, device: str) -> tuple[Any, Any]:
    """(model on `device`, tokenizer) from a checkpoint dir."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gpt2exp.model import quiet_transformers

    quiet_transformers()
    model = GPT2LMHeadModel.from_pretrained(checkpoint)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:  # a bad device string, or a device this torch cannot use
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot use --device {device}: {reason}") from None
    return model, AutoTokenizer.from_pretrained(checkpoint)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not math.isfinite(args.temperature):
        parser.error(f"argument --temperature: must be a finite number, got {args.temperature}")
    if args.temperature < 0:
        parser.error(f"argument --temperature: must be >= 0 (0: greedy), got {args.temperature:g}")
    try:
        model, tokenizer = load(find_checkpoint(args.path), args.device)
    except UserError as exc:
        fail(str(exc))
    texts = sample_texts(
        model,
        tokenizer,
        prompt=args.prompt,
        count=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"=== sample {i + 1} ===")
        print(text)


if __name__ == "__main__":
    main()
