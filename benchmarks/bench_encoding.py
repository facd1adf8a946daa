"""Image encoding through transformers' CLIP forward, against the matrix products that forward has to do.

Everything is measured in one process, so ratios are meaningful on a shared, noisy machine; only ratios are printed.

1. **GEMM bound**: the forward's matrix products timed alone on random operands of the same shapes and dtype, into
   preallocated outputs (patch embedding as a GEMM; per layer the q, k, v and output projections, the two MLP
   products and the two batched attention products; the final projection). No model does fewer.
2. **forward**: ``CLIPModel.get_image_features`` (SDPA attention, ``torch.inference_mode``) on a batch of pixels, in
   float32 and under ``torch.autocast(bfloat16)`` — what :class:`kplib.io.encoders.Encoder` runs.
3. **encode_images**: the same through :meth:`kplib.io.encoders.Encoder.encode_images` from 224×224 PIL images (the
   image processor included).
4. **embed_images from files**: :func:`kplib.pipeline.embed_images` on a folder of hospital-sized JPEGs (2048×2048
   grayscale; no store), with files decoded one at a time (``preprocess_threads=1``) and in the default
   ``Encoder.preprocess_threads`` threads. The tower has the two layers of ``--quick`` here, so that the forward is
   cheap next to decoding, as it is on a GPU; with a full tower on a CPU the forward dilutes the ratio.

Printed: fraction of the GEMM bound reached (GEMM time ÷ forward time, at most 1), bf16 autocast's speed-up over
float32 (forward, and encode_images end to end), the image processor's share of the encoding time, and the cosine
between bf16 and fp32 embeddings.
Weights are random (speed does not depend on their values); each time is the best of ``--repeats`` rounds.

Run: ``python benchmarks/bench_encoding.py [--quick] [--repeats N] [--batch B]``.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kplib import paths  # noqa: E402
from kplib.io.encoders import STANDIN_PROCESSOR, Encoder, EncoderIdentity  # noqa: E402
from kplib.pipeline import embed_images  # noqa: E402

#: openai/clip-vit-base-patch16's image tower.
VIT_B16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
           "patch_size": 16, "image_size": 224, "projection_dim": 512}
#: --quick: two layers of the same shapes.
QUICK = {**VIT_B16, "num_hidden_layers": 2}
SMALL_TEXT = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 2, "max_position_embeddings": 77}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gemm_ops(cfg: dict, batch: int, dtype: torch.dtype):
    """A function running the forward's matrix products alone, on random operands of the same shapes and dtype."""
    d, m, heads, p = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["patch_size"]
    patches = (cfg["image_size"] // p) ** 2
    tokens, dh = patches + 1, d // heads
    g = torch.Generator().manual_seed(0)

    def linear(rows: int, fan_in: int, fan_out: int):
        a = torch.randn(rows, fan_in, generator=g).to(dtype)
        w = torch.randn(fan_out, fan_in, generator=g).to(dtype).t()   # nn.Linear multiplies by its weight's transpose
        b, out = torch.randn(fan_out, generator=g).to(dtype), torch.empty(rows, fan_out, dtype=dtype)
        return lambda: torch.addmm(b, a, w, out=out)

    def bmm(n: int, rows: int, inner: int, cols: int):
        a, b = torch.randn(n, rows, inner, generator=g).to(dtype), torch.randn(n, inner, cols, generator=g).to(dtype)
        out = torch.empty(n, rows, cols, dtype=dtype)
        return lambda: torch.bmm(a, b, out=out)

    rows = batch * tokens
    layer = [linear(rows, d, d) for _ in range(4)] + [linear(rows, d, m), linear(rows, m, d),
                                                      bmm(batch * heads, tokens, dh, tokens),
                                                      bmm(batch * heads, tokens, tokens, dh)]
    ops = [linear(batch * patches, 3 * p * p, d)] + layer * cfg["num_hidden_layers"] + [
        linear(batch, d, cfg["projection_dim"])]

    def run():
        with torch.inference_mode():
            for op in ops:
                op()
    return run


def build_encoder(cfg: dict, dtype: str) -> Encoder:
    config = CLIPConfig(projection_dim=cfg["projection_dim"], vision_config=cfg,
                        text_config={**SMALL_TEXT, "projection_dim": cfg["projection_dim"]}, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = CLIPModel(config)
    tokenizer = CLIPTokenizer.from_pretrained(str(paths.tokenizer_dir()))
    return Encoder(model, tokenizer, CLIPImageProcessorPil(**STANDIN_PROCESSOR),
                   EncoderIdentity("random ViT", "bench", False), dtype=dtype)


def measure(cfg: dict, batch: int, repeats: int) -> dict:
    """Best times of the GEMM bound, the forward, the image processor and encode_images in fp32 and bf16 (each round
    times all of them, so they see the same machine load), and the min cosine between bf16 and fp32 embeddings."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(batch)]
    pixels = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(1))
    fp32 = build_encoder(cfg, "float32")
    out: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        enc = fp32 if name == "fp32" else Encoder(fp32.model, fp32.tokenizer, fp32.processor, fp32.identity,
                                                  dtype="bfloat16")

        def forward(enc=enc):
            with torch.inference_mode(), enc._autocast():
                enc.model.get_image_features(pixel_values=pixels)

        steps = {"gemm": gemm_ops(cfg, batch, dtype), "forward": forward,
                 "preprocess": lambda enc=enc: enc.processor(images=images, return_tensors="pt"),
                 "encode": lambda enc=enc: enc.encode_images(images, batch_size=batch)}
        for fn in steps.values():
            fn()  # warm-up: allocations, kernel selection
        out[name] = dict.fromkeys(steps, float("inf"))
        for _ in range(repeats):
            for k, fn in steps.items():
                out[name][k] = min(out[name][k], timed(fn))
        out[name]["embeddings"] = enc.encode_images(images, batch_size=batch)
    out["cosine"] = float((out["fp32"]["embeddings"] * out["bf16"]["embeddings"]).sum(1).min())
    return out


def measure_files(cfg: dict, n: int, repeats: int) -> dict:
    """Best times of ``embed_images`` on ``n`` 2048×2048 JPEGs with decoding in 1 thread and in the default count."""
    enc, rng, best = build_encoder(cfg, "float32"), np.random.default_rng(0), {}
    threads = enc.preprocess_threads
    with tempfile.TemporaryDirectory() as root:
        for i in range(n):
            folder = Path(root, "data", f"class_{i % 2}")
            folder.mkdir(parents=True, exist_ok=True)
            ramp = np.linspace(0, 200, 2048)[None, :] + rng.random((2048, 2048)) * 40
            buf = io.BytesIO()
            Image.fromarray(ramp.astype(np.uint8)).save(buf, format="JPEG", quality=90)
            (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())
        for k in (1, threads) * repeats:
            enc.preprocess_threads = k
            best[k] = min(best.get(k, float("inf")), timed(lambda: embed_images(Path(root, "data"), enc, cache=False)))
    return {"threads": threads, "n": n, "serial": best[1], "threaded": best[threads]}


def report(label: str, cfg: dict, batch: int, repeats: int, r: dict) -> None:
    tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    print(f"{label}: {cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}, {tokens} tokens, random weights; "
          f"batch {batch}, best of {repeats}, {torch.get_num_threads()} torch threads")
    print(f"{'':16} | {'fraction of GEMM bound':>22} | {'preprocessing share':>19}")
    for name in ("fp32", "bf16"):
        t = r[name]
        print(f"{name + (' autocast' if name == 'bf16' else ''):16} | {t['gemm'] / t['forward']:>22.2f} | "
              f"{t['preprocess'] / (t['preprocess'] + t['forward']):>19.1%}")
    print(f"bf16 autocast over fp32: forward x{r['fp32']['forward'] / r['bf16']['forward']:.2f}, encode_images "
          f"x{r['fp32']['encode'] / r['bf16']['encode']:.2f}; min cosine bf16 vs fp32 {r['cosine']:.6f}")
    print("(fraction of GEMM bound: time of the forward's matrix products alone ÷ time of the forward, at most 1; "
          "preprocessing share: the image processor's time ÷ (processor + forward))")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two ViT-B/16 layers, batch 4, one round (smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="images per forward (default 32; 4 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per figure (default 3; 1 with --quick)")
    args = ap.parse_args(argv)
    cfg, label = (QUICK, "ViT-B/16 shapes (2 layers, --quick)") if args.quick else (VIT_B16, "ViT-B/16")
    batch = args.batch or (4 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    report(label, cfg, batch, repeats, measure(cfg, batch, repeats))
    f = measure_files(QUICK, 2 * batch, repeats)
    print(f"embed_images on {f['n']} files of 2048×2048 JPEG, 2-layer tower, no store: decoding in "
          f"{f['threads']} threads x{f['serial'] / f['threaded']:.2f} over one ({f['serial'] / f['n'] * 1000:.0f} → "
          f"{f['threaded'] / f['n'] * 1000:.0f} ms per image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
