"""What one GPU needs to fine-tune π0 at full size, by ``policy.options.vlm``: the bytes of weights (float32, as
flywheel holds them; bf16 autocast computes in bf16 over them), gradients and AdamW's two moments, counted from the
parameters each option trains (flywheel's π0 built on the meta device, so nothing is allocated). Activations come
on top: ``gradient_checkpointing`` keeps them to a layer's at a time.

    PYTHONPATH=. .venv/bin/python bench/pi0_memory.py

An estimate from counts, not a measurement: it needs no GPU and writes no result file; its table is in
bench/RESULTS.md.
"""

from __future__ import annotations

import torch

from flywheel.vla.pi0 import Pi0, Pi0Config
from flywheel.vla.pi0_policy import trains


def counts(vlm: str, rank: int = 16) -> tuple[int, int]:
    """(all parameters, trained parameters) of the full-size π0 with ``vlm`` train / frozen / lora."""
    with torch.device("meta"):
        model = Pi0(Pi0Config())
        trains(model, vlm, rank)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    print("| policy.options.vlm | parameters | trained | weights + gradients + AdamW moments |")
    print("|---|---|---|---|")
    for vlm in ("train", "frozen", "lora"):
        every, trained = counts(vlm)
        print(f"| {vlm} | {every / 1e9:.2f}B | {trained / 1e6:.0f}M | {(every * 4 + trained * 12) / 2 ** 30:.1f} GB |")


if __name__ == "__main__":
    main()
