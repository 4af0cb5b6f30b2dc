"""Peak memory of ``slice_hf`` against the size of the checkpoint it streams.

Builds a random Gemma 3n text model (about 280 MB in fp32), saves it in shards of
``--shard-mb``, then slices it in a fresh process and reports that process's peak resident
memory above its state right before slicing, next to the largest shard and the whole
checkpoint. Streaming means the peak follows the shard size, not the model size.

    python benchmarks/slice_memory.py [--shard-mb 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys
import torch
from matformer.submodels.gemma3n import slice_hf
torch.set_flush_denormal(True)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

src, dst = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS")
slice_hf(src, dst, [4096] * 8, [1, 6])
print(json.dumps({"before_kb": before, "after_kb": status("VmHWM")}))
"""

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard-mb", type=int, default=40)
    args = p.parse_args()
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.set_flush_denormal(True)
    cfg = Gemma3nTextConfig(
        vocab_size=4096, vocab_size_per_layer_input=4096, hidden_size=256,
        hidden_size_per_layer_input=64, intermediate_size=[8192] * 10, num_hidden_layers=10,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, num_kv_shared_layers=4,
        laurel_rank=16, altup_num_inputs=2, max_position_embeddings=256)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        Gemma3nForCausalLM(cfg).save_pretrained(str(src), max_shard_size=f"{args.shard_mb}MB")
        shards = [f.stat().st_size for f in src.glob("*.safetensors")]
        out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "dst")],
                             check=True, capture_output=True, text=True).stdout
        rss = json.loads(out.strip().splitlines()[-1])
    peak = (rss["after_kb"] - rss["before_kb"]) / 1024
    total, largest = sum(shards) / 2**20, max(shards) / 2**20
    print(f"checkpoint {total:.0f} MiB in {len(shards)} shards (largest {largest:.0f} MiB); "
          f"slicing raised the peak resident memory by {peak:.0f} MiB "
          f"({peak / total:.2f}x the checkpoint, {peak / largest:.2f}x the largest shard)")


if __name__ == "__main__":
    main()
