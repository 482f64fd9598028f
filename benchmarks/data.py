"""Data at scale, measured side by side in one run, on a corpus generated here (nothing downloads).

    python benchmarks/data.py                          # 1 GB of parquet, 2 processes (~30 min on 2 cores)
    python benchmarks/data.py --gb 0.02 --old none     # a smoke run of the code paths

The corpus: parquet files of 128 MB of text with a `text` column (FineWeb's layout), documents of
random Shakespeare lines; the tokenizer: a GPT-2-style byte-level BPE (vocabulary 50257, uint16 ids)
trained on a sample and saved locally, used by both sides. Figures:

1. Tokenization throughput, MB of text per second per process: `python -m gpt2exp.data prepare`
   against nanoGPT's data/openwebtext/prepare.py pattern (load_dataset, train_test_split,
   `.map(encode one document, num_proc=N)`, then a memmap written in 1024 batches), with the same
   tokenizer and the same number of processes, on the whole corpus (>= 1 GB).
2. Peak resident memory of `prepare` at 1x (a quarter of the corpus) and 4x: parent and the largest
   tokenizer process (`ru_maxrss`).
3. The sampler on the shards of 1x and 4x: start-up (open the cache, first batch of 16 x 1024
   tokens), batches per second, and its process's peak RSS.
4. The default `python -m gpt2exp.train` data start-up (prepare_data, the sampler, a first batch)
   of this tree against the code of `--old` (a `git worktree add /tmp/old <commit>` checkout of the
   commit before token shards), on a cold cache (built from nothing) and a warm one.
5. One long text file (`data=text_files`, a file is one document) of `--long-mb` MB: peak memory
   and time of `prepare` encoding it in pieces (shards.PIECE_CHARS) against encoding it whole, one
   process each, and whether the shards are the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILE_BYTES = 128 << 20

NANOGPT = r"""
import json, os, resource, sys, time
import numpy as np
from datasets import load_dataset
from tokenizers import Tokenizer
files, tok_file, out, num_proc = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
enc = Tokenizer.from_file(tok_file)
eot = enc.token_to_id("<|endoftext|>")
dataset = load_dataset("parquet", data_files=files, cache_dir=out + "/hf")
split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split_dataset["val"] = split_dataset.pop("test")
def process(example):
    ids = enc.encode(example["text"], add_special_tokens=False).ids
    ids.append(eot)
    return {"ids": ids, "len": len(ids)}
tokenized = split_dataset.map(process, remove_columns=["text", "id"], desc="tokenizing", num_proc=num_proc)
for split, dset in tokenized.items():
    arr_len = np.sum(dset["len"], dtype=np.uint64)
    arr = np.memmap(os.path.join(out, f"{split}.bin"), dtype=np.uint16, mode="w+", shape=(arr_len,))
    idx = 0
    total_batches = min(1024, len(dset))  # nanoGPT: 1024 (its val split has ~4,000 documents)
    for batch_idx in range(total_batches):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": int(idx)}))
"""

PREPARE = r"""
import json, resource, sys, time
start = time.perf_counter()
from gpt2exp.data import main
main(["prepare", *sys.argv[1:]])
self, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_mb": self.ru_maxrss / 1024, "child_rss_mb": children.ru_maxrss / 1024}))
"""

SAMPLER = r"""
import json, resource, sys, time
start = time.perf_counter()
from gpt2exp.data import BatchSampler, prepare_data
from gpt2exp.composing import compose
from gpt2exp.config import CONF_DIR
cfg = compose(CONF_DIR, sys.argv[1:])
data = prepare_data(cfg.data)
sampler = BatchSampler(data.train, 1024, 16, 1337)
sampler.next_batch()
startup = time.perf_counter() - start
t = time.perf_counter()
for _ in range(300):
    x, y = sampler.next_batch()
rate = 300 / (time.perf_counter() - t)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"startup_s": startup, "batches_per_s": rate, "rss_mb": rss, "tokens": len(data.train)}))
"""

STARTUP = r"""
import json, sys, time
start = time.perf_counter()
from gpt2exp.config import CONF_DIR
from gpt2exp.composing import compose
from gpt2exp.data import BatchSampler, prepare_data, val_batches
cfg = compose(CONF_DIR, [f"data.cache_dir={sys.argv[1]}"])
data = prepare_data(cfg.data)
sampler = BatchSampler(data.train, cfg.model.block_size, cfg.trainer.batch_size, cfg.seed)
sampler.next_batch()
val_batches(data.val, cfg.model.block_size, cfg.trainer.batch_size, cfg.trainer.eval_batches)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


WHOLE = "import gpt2exp.shards\ngpt2exp.shards.PIECE_CHARS = 1 << 62  # every document encoded whole\n"


def run_json(code: str, *args: str, pythonpath: Path = REPO, env: dict | None = None) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env)
    if result.returncode:
        raise SystemExit(f"benchmark step failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def generate(folder: Path, parquet_bytes: int, file_bytes: int = FILE_BYTES, seed: int = 0) -> list[Path]:
    """Parquet files (snappy, as FineWeb ships) of `file_bytes` of text each, documents of 2-200 random
    Shakespeare lines, until the files hold `parquet_bytes` on disk; a multiple of 4 files (1x = a quarter)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt2exp.sources import markdown_to_text, shakespeare_files

    lines = [line for p in shakespeare_files() for line in markdown_to_text(p.read_text()).splitlines() if line]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    while sum(p.stat().st_size for p in files) < parquet_bytes or len(files) % 4:
        path = folder / f"part-{len(files):05d}.parquet"
        if not path.exists():
            docs, got = [], 0
            while got < min(file_bytes, parquet_bytes):
                picked = rng.integers(0, len(lines), size=int(rng.integers(2, 200)))
                doc = "\n".join(lines[i] for i in picked)
                docs.append(doc)
                got += len(doc.encode())
            pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=10_000)
        files.append(path)
    return files


def tokenizer_for(folder: Path, corpus: Path) -> Path:
    import pyarrow.parquet as pq

    from gpt2exp.data import train_bpe

    out = folder / "gpt2-style-tokenizer"
    if not (out / "tokenizer.json").exists():
        texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()[:5000]
        train_bpe(texts, 50257, out)
    return out


def text_mb(files: list[Path]) -> float:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(pc.sum(pc.binary_length(pq.read_table(f, columns=["text"]).column(0))).as_py() for f in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the 4x corpus's parquet files, GB")
    parser.add_argument("--file-mb", type=int, default=FILE_BYTES >> 20, help="MB of text per parquet file")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work", default="/tmp/gpt2exp-data-bench")
    parser.add_argument("--old", default="/tmp/old", help="a checkout of the code before token shards, or none")
    parser.add_argument("--parts", default="1,2,3,4,5", help="which figures to measure, e.g. 1 (throughput only)")
    parser.add_argument("--long-mb", type=int, default=32, help="MB of text in figure 5's single file")
    args = parser.parse_args()
    work = Path(args.work)
    files = generate(work / "corpus", int(args.gb * 1e9), args.file_mb << 20)
    quarter = files[: len(files) // 4]
    tokenizer = tokenizer_for(work, files[0])
    mb4, mb1 = text_mb(files), text_mb(quarter)
    n = args.num_proc
    parquet_mb = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"corpus: {len(files)} parquet files, {parquet_mb:,.0f} MB of parquet, {mb4:,.0f} MB of text "
        f"(1x: {len(quarter)} files, {mb1:,.0f} MB); {n} processes"
    )

    def prepare(name: str, paths: list[Path]) -> dict:
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        spec = str(paths[0].parent / "*.parquet") if paths == files else None
        if spec is None:  # the 1x corpus: its own folder of links to the first files
            sub = work / f"corpus-{name}"
            shutil.rmtree(sub, ignore_errors=True)
            sub.mkdir()
            for p in paths:
                (sub / p.name).symlink_to(p)
            spec = str(sub / "*.parquet")
        overrides = [
            "data=hf_dataset",
            f"data.dataset={spec}",
            f"data.tokenizer.name={tokenizer}",
            f"data.cache_dir={cache}",
            f"data.num_proc={n}",
        ]
        return {**run_json(PREPARE, *overrides), "overrides": overrides}

    parts = {int(p) for p in args.parts.split(",")}
    ours4 = prepare("4x", files) if parts & {1, 2, 3} else None
    if 1 in parts:
        nano_out = work / "nanogpt"
        shutil.rmtree(nano_out, ignore_errors=True)
        nano_out.mkdir()
        tokenizer_file = str(tokenizer / "tokenizer.json")
        env = {"TOKENIZERS_PARALLELISM": "false"}
        nano = run_json(NANOGPT, ",".join(map(str, files)), tokenizer_file, str(nano_out), str(n), env=env)
        shutil.rmtree(nano_out, ignore_errors=True)
        ours_rate, nano_rate = mb4 / ours4["seconds"] / n, mb4 / nano["seconds"] / n
        print("\n1. tokenization throughput, MB of text per second per process (whole run: read, tokenize, write)")
        print(f"   gpt2exp prepare         {ours_rate:6.2f} MB/s/proc  ({ours4['seconds']:.0f} s)")
        print(f"   nanoGPT prepare.py      {nano_rate:6.2f} MB/s/proc  ({nano['seconds']:.0f} s)")
        print(f"   ratio                   {ours_rate / nano_rate:6.2f}x  (target >= 1.0)")

    ours1 = prepare("1x", quarter) if parts & {2, 3} else None
    if 2 in parts:
        total1 = ours1["rss_mb"] + n * ours1["child_rss_mb"]
        total4 = ours4["rss_mb"] + n * ours4["child_rss_mb"]
        print("\n2. peak resident memory of prepare (parent + each tokenizer process)")
        print(
            f"   1x {mb1:,.0f} MB   parent {ours1['rss_mb']:.0f} MB, "
            f"process {ours1['child_rss_mb']:.0f} MB, total {total1:.0f} MB"
        )
        print(
            f"   4x {mb4:,.0f} MB   parent {ours4['rss_mb']:.0f} MB, "
            f"process {ours4['child_rss_mb']:.0f} MB, total {total4:.0f} MB"
        )
        print(f"   ratio 4x / 1x           {total4 / total1:6.2f}  (target <= 1.2)")

    if 3 in parts:
        print("\n3. sampler over the shards: 16 x 1024 tokens per batch")
        for name, result in (("1x", ours1), ("4x", ours4)):
            s = run_json(SAMPLER, *result["overrides"])
            print(
                f"   {name} {s['tokens']:>13,} tokens: start-up {s['startup_s']:.2f} s, "
                f"{s['batches_per_s']:,.0f} batches/s, peak RSS {s['rss_mb']:.0f} MB"
            )

    if 4 in parts and args.old != "none":
        print(f"\n4. default (Shakespeare) data start-up: this tree vs {args.old}")
        for label, path in (("old", Path(args.old)), ("new", REPO)):
            cache = work / f"startup-{label}"
            shutil.rmtree(cache, ignore_errors=True)
            cold = run_json(STARTUP, str(cache), pythonpath=path)["seconds"]
            warm = min(run_json(STARTUP, str(cache), pythonpath=path)["seconds"] for _ in range(3))
            print(f"   {label}: cold {cold:.2f} s, warm {warm:.2f} s")
            if label == "old":
                old_cold, old_warm = cold, warm
        print(f"   ratio new / old: cold {cold / old_cold:.2f}, warm {warm / old_warm:.2f}  (target <= 1.0)")

    if 5 in parts:
        long_file = work / "long.txt"
        texts = [t for p in files[:1] for t in _texts_of(p)]
        with open(long_file, "w") as out:
            written = 0
            while written < args.long_mb << 20:
                for text in texts:
                    written += out.write(text + "\n")
        print(f"\n5. one {long_file.stat().st_size / 1e6:,.0f} MB text file (one document), one process")
        figures = {}
        for label, code in (("pieces", PREPARE), ("whole", WHOLE + PREPARE)):
            cache = work / f"long-{label}"
            shutil.rmtree(cache, ignore_errors=True)
            overrides = ["data=text_files", f"data.files=[{long_file}]", f"data.tokenizer.name={tokenizer}"]
            figures[label] = run_json(code, *overrides, f"data.cache_dir={cache}", "data.num_proc=1")
            figures[label]["shards"] = {p.name: p.read_bytes() for p in sorted(cache.glob("*/*.bin"))}
            shutil.rmtree(cache, ignore_errors=True)
            f = figures[label]
            print(f"   {label:<7} peak RSS {f['rss_mb']:7,.0f} MB, {f['seconds']:5.1f} s")
        ratio = figures["pieces"]["rss_mb"] / figures["whole"]["rss_mb"]
        same = figures["pieces"]["shards"] == figures["whole"]["shards"]
        print(f"   ratio pieces / whole: memory {ratio:.2f}; shards the same bytes: {same}")


def _texts_of(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column(0).to_pylist()


if __name__ == "__main__":
    main()
