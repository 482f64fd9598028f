"""Evaluate a checkpoint without training: validation loss, perplexity and bits per byte.

    python -m gpt2exp.evaluate outputs/<date>/<time>                          # the run's own data and windows
    python -m gpt2exp.evaluate outputs/<date>/<time>/checkpoints/step_00000300 --batches all
    python -m gpt2exp.evaluate outputs/<date>/<time> data=text_files "data.files=[my/story.txt]" --json
    python -m gpt2exp.evaluate outputs/<date>/<time> data.val_fraction=0.2 --batch-size 32 --device cuda

A run dir uses its newest checkpoint that verifies; a checkpoint dir is used as it is (after
verification). The data is the run's own (the `data` section of its config of record) unless data
overrides say otherwise, written as on the train command line: `data.KEY=VALUE` changes a key of the
run's data section, `data=OPTION` starts from that option's file (conf/data/OPTION.yaml) instead. They
are checked as the train command checks them (types, ranges, keys of another option), one error line
each. The text is always encoded with the checkpoint's own tokenizer (data.tokenizer.* cannot be
overridden), and only its validation part is used: the last data.val_fraction of the text, or the
data set's data.val_split. A checkpoint outside a run has no config of record: the defaults of conf/
(data=shakespeare) stand in for it.

The windows are the trainer's: --batches N batches of --batch-size evenly spaced windows of the run's
model.block_size tokens (defaults: the run's trainer.eval_batches and trainer.batch_size), so on its
own data the loss is the val/loss training logged at that checkpoint's step; `--batches all` takes
every non-overlapping window instead. Loss is the mean next-token cross-entropy in nats, perplexity
exp(loss), and bits per byte the total nats / (ln 2 x the UTF-8 bytes of the text the target tokens
decode to; special tokens count 0), which compares across tokenizers. Nothing is written: not into
the run dir, not into the token cache. Exit code 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gpt2exp import cli
from gpt2exp.errors import UserError, fail

PROG = "python -m gpt2exp.evaluate"


# -- the data ------------------------------------------------------------------------------------


def data_config(record: Any, overrides: list[str]) -> Any:
    """The `data` section to evaluate on: the record's, with `overrides` (Hydra syntax) applied.

    `data=OPTION` starts from that option's file, as on the train command line; `data.KEY=VALUE`
    changes one key. The overrides are composed and checked with the rest of the config at its
    defaults (composing.compose: types, ranges, a key of another option), so a bad one is one UserError.
    """
    from omegaconf import OmegaConf

    from gpt2exp.composing import compose
    from gpt2exp.config import CONF_DIR, check_applicable, validate
    from gpt2exp.overrides import key_of, last_value, parse

    parsed = parse(overrides)
    for override in parsed:
        key, line = key_of(override), override.input_line
        if key != "data" and not key.startswith("data."):
            raise UserError(f"{line} is not a data override; evaluate takes data=OPTION and data.KEY=VALUE only")
        if override.is_add() or override.is_delete() or override.is_sweep_override():
            raise UserError(f"{line}: give data overrides as data=OPTION or data.KEY=VALUE (one value each)")
        if key == "data.tokenizer" or key.startswith("data.tokenizer."):
            raise UserError(f"{line}: the text is encoded with the checkpoint's own tokenizer, which cannot change")
    choice = last_value(parsed, "data")
    keys = [o.input_line for o in parsed if key_of(o) != "data"]
    composed = compose(CONF_DIR, [f"data={choice or record.data.source}", *keys], validated=False)
    check_applicable(composed)  # a key of another option than the data's
    if choice is None:  # the record's data (its files, its dataset) with these keys changed
        data = record.data.copy()
        for override in parsed:
            key = key_of(override)
            OmegaConf.update(data, key.removeprefix("data."), OmegaConf.select(composed, key), merge=False)
        composed.data = data
    validate(composed)  # what is required (data.files, data.dataset) is checked once the record filled it in
    return composed.data


def val_tokens(data_cfg: Any, tokenizer) -> np.ndarray:
    """The validation text of `data_cfg` encoded with `tokenizer`, each document followed by its
    end-of-text token: the layout of the trainer's token cache (data.prepare_data), built in memory."""
    from gpt2exp.data import tokenize, validation_texts

    return tokenize(tokenizer, validation_texts(data_cfg))


def token_bytes(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of each token id's text, for a byte-level BPE (gpt2exp's own, GPT-2's): each
    character of a token's string then stands for one byte, so the bytes of any token sequence are a
    sum, exact even where a window cuts a character in two. Special tokens count 0. None for other
    tokenizers (their windows are decoded instead)."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = tokenizer.added_tokens_decoder  # id -> AddedToken: stored as text, not in the byte alphabet
    counts = np.zeros(size, dtype=np.int64)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if token_id in special or token is None:
            continue
        counts[token_id] = len(added[token_id].content.encode()) if token_id in added else len(token)
    return counts


# -- the windows ---------------------------------------------------------------------------------


def all_windows(tokens: np.ndarray, block_size: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every non-overlapping window of `block_size` inputs (and their next tokens), in batches."""
    from gpt2exp.data import windows

    starts = np.arange(0, len(tokens) - block_size, block_size, dtype=np.int64)
    if not len(starts):
        raise UserError(
            f"the validation data holds {len(tokens)} tokens, fewer than model.block_size={block_size}; "
            "raise data.val_fraction"
        )
    return [windows(tokens, starts[i : i + batch_size], block_size) for i in range(0, len(starts), batch_size)]


@dataclass
class Evaluation:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    bits_per_byte: float
    nats: float  # summed over every target token
    tokens: int  # target tokens scored
    bytes: int  # UTF-8 bytes of the text those tokens decode to
    windows: int


def evaluate_windows(model, tokenizer, batches, device, precision: str = "fp32") -> Evaluation:
    """Loss, perplexity and bits per byte of `model` over `batches` of (inputs, targets) windows.

    Each batch's loss is the trainer's (`next_token_loss` under its autocast), so with the trainer's
    windows the mean is its val/loss; batches of different sizes are weighted by their tokens.
    """
    import torch

    from gpt2exp.trainer import autocast_context, next_token_loss

    per_token = token_bytes(tokenizer)
    nats, tokens, num_bytes, count = 0.0, 0, 0, 0
    model.eval()
    with torch.no_grad(), autocast_context(device, precision):
        for x, y in batches:
            loss = next_token_loss(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)).item()
            nats += loss * y.size
            tokens += y.size
            count += len(y)
            if per_token is not None:
                num_bytes += int(per_token[y].sum())
            else:
                num_bytes += sum(len(tokenizer.decode(row, skip_special_tokens=True).encode()) for row in y.tolist())
    loss = nats / tokens
    bits_per_byte = nats / (math.log(2) * num_bytes) if num_bytes else float("nan")
    return Evaluation(loss, math.exp(loss), bits_per_byte, nats, tokens, num_bytes, count)


# -- the command line ----------------------------------------------------------------------------


def batches_arg(text: str) -> int | None:
    """--batches: a count >= 1, or `all` (None)."""
    return None if text == "all" else cli.positive_int(text)


def build_parser() -> cli.ArgumentParser:
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("path", metavar="PATH", help="a run dir (its newest good checkpoint) or a checkpoint dir")
    parser.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="data=OPTION, data.KEY=VALUE (default: the run's own data)"
    )
    parser.add_argument(
        "--batches",
        type=batches_arg,
        default=argparse.SUPPRESS,
        metavar="N",
        help="validation batches, >= 1, or `all` for every window (the run's trainer.eval_batches)",
    )
    batch_help = "windows per batch, >= 1 (the run's trainer.batch_size)"
    parser.add_argument("--batch-size", type=cli.positive_int, metavar="N", help=batch_help)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (auto: cuda, mps, cpu)")
    parser.add_argument(
        "--num-threads",
        type=cli.positive_int,
        metavar="N",
        help="torch CPU threads, >= 1 (the run's trainer.num_threads, as its logged val/loss was computed)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def run_config(target) -> tuple[Any, bool]:
    """The config of record of the run `target` belongs to, or the defaults for a loose checkpoint."""
    from gpt2exp.composing import compose
    from gpt2exp.config import CONF_DIR
    from gpt2exp.rundir import read_config_of_record

    if target.run_dir is not None:
        return read_config_of_record(target.run_dir), True
    return compose(CONF_DIR, []), False


def pick_device(name: str):
    import torch

    from gpt2exp.trainer import pick_device as pick

    if name == "auto":
        return pick("auto")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # a bad device string, or a device this torch cannot use
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot use --device {name}: {reason}") from None
    return device


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """What `main` prints, as a dict (the --json object)."""
    import torch
    from omegaconf import OmegaConf

    from gpt2exp.checkpoint import manifest_metric, step_of
    from gpt2exp.data import val_batches
    from gpt2exp.generate import find_checkpoint, load
    from gpt2exp.targets import resolve_target
    from gpt2exp.trainer import use_tf32

    target = resolve_target(args.path)
    record, in_run = run_config(target)
    data = data_config(record, args.overrides)
    checkpoint = find_checkpoint(args.path)
    device = pick_device(args.device)
    threads = args.num_threads or (record.trainer.num_threads if in_run else None)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    use_tf32(device)  # as the trainer evaluates
    model, tokenizer = load(checkpoint, str(device))
    block_size = record.model.block_size if in_run else model.config.n_positions
    batch_size = args.batch_size or record.trainer.batch_size
    num_batches = getattr(args, "batches", record.trainer.eval_batches)
    tokens = val_tokens(data, tokenizer)
    if num_batches is None:
        batches = all_windows(tokens, block_size, batch_size)
    else:
        batches = val_batches(tokens, block_size, batch_size, num_batches)
    precision = record.trainer.precision if in_run else "fp32"
    result = evaluate_windows(model, tokenizer, batches, device, precision)
    own_data = in_run and data == record.data
    trainers = (record.trainer.batch_size, record.trainer.eval_batches)
    trainers_windows = own_data and (batch_size, num_batches) == trainers
    return {
        "checkpoint": str(checkpoint),
        "step": step_of(checkpoint),
        "data": OmegaConf.to_container(data, resolve=True, enum_to_str=True),
        "own_data": own_data,
        "val_tokens": len(tokens),
        "block_size": block_size,
        "batch_size": batch_size,
        "batches": len(batches),
        **asdict(result),
        "logged_val_loss": manifest_metric(checkpoint, "val/loss") if trainers_windows else None,
        "device": str(device),
    }


def describe_data(data: dict[str, Any]) -> str:
    if data["source"] == "text_files":
        where = ", ".join(data["files"])
    elif data["source"] == "hf_dataset":
        where = f"{data['dataset']} ({data['val_split'] or data['split']})"
    else:
        where = data["source"]
    if data.get("val_split"):
        split = f"split {data['val_split']}"
    elif data.get("holdout", "tail") == "documents":  # a record from before data.holdout cut the tail
        split = f"{data['val_fraction']:g} of the documents held out"
    else:
        split = f"last {data['val_fraction']:g} of the text"
    return f"{where}, {split}"


def table(out: dict[str, Any]) -> str:
    data = describe_data(out["data"]) + (" (the run's own)" if out["own_data"] else "")
    logged = out["logged_val_loss"]
    logged_text = f"  (training logged {logged:.4f} at this step)" if logged is not None else ""
    windows = f"{out['windows']:,} of {out['block_size']} tokens in {out['batches']} batches, on {out['device']}"
    rows = [
        ("checkpoint", f"{out['checkpoint']} (step {out['step']})"),
        ("data", f"{data}: {out['val_tokens']:,} validation tokens"),
        ("windows", windows),
        ("loss", f"{out['loss']:.4f}{logged_text}"),
        ("perplexity", f"{out['perplexity']:.2f}"),
        ("bits/byte", f"{out['bits_per_byte']:.4f}  ({out['nats']:,.1f} nats over {out['bytes']:,} bytes)"),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)  # overrides and --options in any order
    try:
        out = evaluate(args)
    except UserError as exc:
        fail(str(exc))
    print(json.dumps(out) if args.json else table(out), flush=True)


if __name__ == "__main__":
    main()
