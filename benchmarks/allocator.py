"""The demos' CPU train steps under glibc's malloc, under glibc's malloc with 2 MiB pages,
and under a preloaded allocator (tcmalloc by default), side by side in one run.

  python benchmarks/allocator.py [--preload=libtcmalloc_minimal.so.4] [--iters=20] [--rounds=2] [--steps=...]

XLA:CPU allocates each step's temporary buffer afresh (267 MiB for SEED-OPT's phase-1
step); glibc maps a block that large anew at every step and the kernel zero-fills it
page by page, which shows as system time. With the `glibc.malloc.hugetlb=1` tunable
(glibc >= 2.35, the kernel's transparent huge pages in `madvise` mode), what `python -m
seed_jax.main` restarts itself with (`seed_jax/host_memory.py`), the kernel backs those
blocks with 2 MiB pages instead. tcmalloc keeps freed pages for reuse and avoids the
faults altogether (jemalloc 5.3.0 did not, here). Each step runs in a child process of
its own (an allocator and glibc's tunables are chosen when the process starts), once per
allocator, rotating which goes first over `--rounds` rounds; `--preload=` leaves the
preloaded allocator out. Steps: the tokenizer demo's stage I (128 images) and stage II
(32), and the SEED-OPT demo's phase 1 (32 packed rows of 128 tokens), on random batches
of the demos' shapes. A child reports the median wall time of `--iters` steps after two
warm-up steps, their user and system CPU time per step and its peak resident memory;
each figure is the median over rounds. On Debian or Ubuntu, `apt-get install
libtcmalloc-minimal4` installs tcmalloc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder
# is first on sys.path: take the folder off, put the repository root on.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import count, name_list  # noqa: E402
from seed_jax import config_files, host_memory, parallel  # noqa: E402
from seed_jax.trainers import loop, seed_opt, tokenizer  # noqa: E402

STEPS = ("tokenizer_stage1", "tokenizer_stage2", "seed_opt_phase1")
FIGURES = ("step_s", "user_s", "sys_s", "peak_rss_mb")


def _tokenizer_step(stage: str):
    """(stage setup, batch): the tokenizer demo's `stage` on a random batch."""
    config = config_files.load(os.path.join(_ROOT, "configs", "tokenizer.py"), "demo")
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = tokenizer.create_model(config, mesh)
    loss_fn, post_update = tokenizer.stage_functions(config, stage)
    setup = loop.prepare_stage(model, tokenizer.trainable(model, config[stage]), loss_fn, config[stage], config,
                               mesh, post_update)
    rng = np.random.default_rng(0)
    b, size, text = tokenizer.stage_batch_size(config, stage), config.model.vit.image_size, config.data.max_text_length
    clip_length = config.clip_text.max_length
    batch = {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
             "text_ids": rng.integers(1, config.model.qformer.vocab_size, (b, text)).astype(np.int32),
             "text_mask": np.ones((b, text), np.int32),
             "clip_ids": rng.integers(1, config.clip_text.vocab_size, (b, clip_length)).astype(np.int32)}
    return setup, batch


def _seed_opt_step():
    """(stage setup, batch): the SEED-OPT demo's phase 1 on random packed rows."""
    config = config_files.load(os.path.join(_ROOT, "configs", "seed_opt.py"), "demo")
    model_config = seed_opt.model_config(config, text_vocab_size=600, num_codes=1024, code_dim=32)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = seed_opt.create_model(model_config, config, mesh)
    setup = loop.prepare_stage(model, seed_opt.trainable(config), seed_opt.lm_loss, config.phase1, config, mesh,
                               stage_index=0)
    rng = np.random.default_rng(0)
    rows, length, targets = config.phase1.batch_size, config.data.seq_length, config.phase1.max_targets_per_row
    vocab = model_config.vocab_size + model_config.extra_tokens
    batch = {"inputs": rng.integers(0, vocab, (rows, length)).astype(np.int32),
             "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
             "segment_ids": np.ones((rows, length), np.int32),
             "target_index": np.sort(rng.choice(length, (rows, targets))).astype(np.int32),
             "target_ids": rng.integers(0, vocab, (rows, targets)).astype(np.int32),
             "target_mask": np.ones((rows, targets), bool)}
    return setup, batch


def _time_steps(step: str, iters: int) -> dict:
    """The child's figures for `step` (one of STEPS)."""
    setup, batch = _seed_opt_step() if step == "seed_opt_phase1" else _tokenizer_step(step.removeprefix("tokenizer_"))
    state, times = setup.state, []
    for i in range(iters + 2):
        if i == 2:
            start = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        state, _ = setup.train_step(state, setup.frozen, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - began)
    end = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_s": float(np.median(times[2:])), "user_s": (end.ru_utime - start.ru_utime) / iters,
            "sys_s": (end.ru_stime - start.ru_stime) / iters, "peak_rss_mb": end.ru_maxrss / 1024,
            "mapped_files": sorted({line.split()[-1] for line in open("/proc/self/maps") if "/" in line})}


GLIBC = "glibc malloc"
GLIBC_HUGE_PAGES = "glibc malloc, 2 MiB pages"


def _child(step: str, iters: int, preload: str = "", tunables: str = "") -> dict:
    """`step`'s figures from a fresh process, with `preload` in LD_PRELOAD ("" = glibc's
    malloc) and `tunables` as GLIBC_TUNABLES ("" = glibc's defaults)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env.update({name: value for name, value in (("LD_PRELOAD", preload), ("GLIBC_TUNABLES", tunables)) if value})
    result = subprocess.run([sys.executable, __file__, f"--child={step}", f"--iters={iters}"], env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{step} with LD_PRELOAD={preload!r} GLIBC_TUNABLES={tunables!r} failed:\n"
                           f"{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # the dynamic loader only warns about a library it cannot find, and runs on without it
    # (as a file of that name, or one it links to: libtcmalloc_minimal.so.4 -> libtcmalloc_minimal.so.4.5.10)
    if preload and not any(os.path.basename(path).startswith(os.path.basename(preload))
                           for path in figures["mapped_files"]):
        raise RuntimeError(f"--preload: {preload} was not loaded (is it installed? the loader said: "
                           f"{result.stderr.strip().splitlines()[:1]})")
    return figures


def _allocators(preload: str) -> dict[str, dict[str, str]]:
    """{label: `_child`'s keyword arguments} of each allocator compared."""
    allocators = {GLIBC: {}, GLIBC_HUGE_PAGES: {"tunables": f"{host_memory.TUNABLE}=1"}}
    if preload:
        allocators[preload] = {"preload": preload}
    return allocators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preload", default="libtcmalloc_minimal.so.4",
                        help="the allocator's shared library, as LD_PRELOAD takes it ('' = none)")
    parser.add_argument("--iters", type=count, default=20)
    parser.add_argument("--rounds", type=count, default=2)
    parser.add_argument("--steps", type=name_list(STEPS), default=",".join(STEPS), help=f"comma-separated, of {STEPS}")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_time_steps(args.child, args.iters)))
        return
    allocators = _allocators(args.preload)
    print(f"glibc {host_memory.glibc_version()}, transparent huge pages: {host_memory.thp_mode()} "
          f"(2 MiB pages need glibc >= 2.35 and madvise or always)")
    print(f"{'step':17s} {'allocator':26s} {'step ms':>8s} {'user ms':>8s} {'sys ms':>7s} {'peak RSS MB':>12s}")
    for step in args.steps:
        runs = {label: [] for label in allocators}
        for r in range(args.rounds):
            order = list(allocators)[r % len(allocators):] + list(allocators)[:r % len(allocators)]
            for label in order:
                runs[label].append(_child(step, args.iters, **allocators[label]))
        medians = {label: {k: float(np.median([run[k] for run in rs])) for k in FIGURES} for label, rs in runs.items()}
        for label, m in medians.items():
            print(f"{step:17s} {label:26s} {m['step_s'] * 1e3:8.1f} {m['user_s'] * 1e3:8.0f} "
                  f"{m['sys_s'] * 1e3:7.0f} {m['peak_rss_mb']:12.0f}")
        for label in list(allocators)[1:]:
            print(f"{step:17s} steps/s with {label} over glibc's defaults: "
                  f"{medians[GLIBC]['step_s'] / medians[label]['step_s']:.2f}x")


if __name__ == "__main__":
    main()
