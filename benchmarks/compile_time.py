"""How long compiling the decoder takes, and what it buys: eager, whole-model graph, regional.

Each form runs in a process of its own (inductor and dynamo keep state per process), with a
fresh inductor cache folder (cold) unless ``--warm``: the first greedy generation of
``--first-tokens`` tokens is timed (it compiles), then ``--tokens`` tokens three times (median).
Output tokens are checked against eager decoding.

    .venv/bin/python benchmarks/compile_time.py --checkpoint runs/smollm2-elastic
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

FORMS = {"eager": False, "whole": True, "regional": "regional"}


def one(checkpoint: str, form: str, first: int, tokens: int) -> dict[str, float]:
    import torch

    from matformer.families import load_checkpoint
    from matformer.generate import generate
    from matformer.runner import RunnerPool

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    model, tok = load_checkpoint(checkpoint)
    model.eval()
    prompt = [tok.encode("The king sat on his throne and")]
    pool = RunnerPool(model, compile=FORMS[form])
    t = time.perf_counter()
    out = generate(model, prompt, first, temperature=0, runners=pool)
    first_s = time.perf_counter() - t
    ref = generate(model, prompt, first, temperature=0, runners=RunnerPool(model, compile=False))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        generate(model, prompt, tokens, temperature=0, runners=pool)
        times.append(time.perf_counter() - t)
    return {"first_s": first_s, "compile_s": pool.compile_seconds,
            "tokens_per_s": tokens / sorted(times)[1], "same": bool(torch.equal(out, ref))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--forms", default="eager,whole,regional")
    p.add_argument("--first-tokens", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warm", action="store_true", help="keep inductor's usual disk cache")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one(args.checkpoint, args.child, args.first_tokens, args.tokens)))
        return 0
    print(f"# {args.checkpoint}: first generation of {args.first_tokens} tokens (compiles), "
          f"then {args.tokens} tokens (median of 3); 1 thread; "
          f"{'warm' if args.warm else 'cold'} inductor cache\n")
    print("| compile | first call (s) | of which compiling (s) | tokens/s after | same tokens |")
    print("|---|---:|---:|---:|---|")
    for form in args.forms.split(","):
        env = dict(os.environ)
        if not args.warm:
            env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
        res = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint,
                              "--child", form, "--first-tokens", str(args.first_tokens),
                              "--tokens", str(args.tokens)], env=env, check=True,
                             capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {form} | {r['first_s']:.1f} | {r['compile_s']:.1f} | {r['tokens_per_s']:.1f} "
              f"| {r['same']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
