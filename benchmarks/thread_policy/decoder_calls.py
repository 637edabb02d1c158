"""Time one mask-decoder call of the shipped model for a few prompt counts and box sizes (box prompts,
window 3x, one chunk): the cost of a call's many small kernels under each OpenMP thread policy.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/thread_policy/decoder_calls.py
    OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 python benchmarks/thread_policy/decoder_calls.py

OpenMP reads the variables when torch loads, so set them before starting Python.
"""

import time

import torch

from cellsam.weights import load_model


def main() -> None:
    net = load_model("default").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        emb = net.encode(net.preprocess(torch.rand(1, 3, 256, 256, generator=gen))).embedding
        for n in (1, 4, 16, 64):
            for side in (10, 40):
                centres = torch.rand(n, 2, generator=gen) * 150 + 50
                boxes = torch.cat([centres - side / 2, centres + side / 2], 1)
                for _ in range(2):
                    net.decode(emb, boxes=boxes, window=3.0, chunk_size=None)
                t = time.perf_counter()
                for _ in range(5):
                    net.decode(emb, boxes=boxes, window=3.0, chunk_size=None)
                dt = (time.perf_counter() - t) / 5 * 1000
                print(f"prompts {n:3d}  box {side:3d} px  {dt:7.2f} ms per call  {dt / n:6.2f} ms per prompt")


if __name__ == "__main__":
    main()
