"""Seconds per Z-Image-Turbo image on this GPU, without downloading the weights.

Latency depends on shapes, dtype and kernels, not on weight values, so this builds the published
Z-Image-Turbo architecture (6.15B transformer, Qwen3-4B text encoder, Flux's 16-channel VAE) with random
bf16 weights, directly on the GPU (CPU init of 10B parameters would take minutes), and times full
1024x1024 text-to-image calls at 8 steps: warm-up runs, then the median of N.

    python bench/gpu_latency.py                 # real size, needs a CUDA GPU with ~30 GB free
    python bench/gpu_latency.py --dry-run       # build the real-size configs on the meta device, count params
    python bench/gpu_latency.py --tiny          # tiny configs on CPU, 64x64, 2 steps
    python bench/gpu_latency.py --smoke         # --tiny, one run, no warm-up (make bench-smoke)

The tokenizer is the offline byte-level one from `airflow_provider_zimage.testing`: one token per byte, so
the default prompt is kept short to give a caption length close to what Qwen's BPE makes of a typical
prompt. Caption length barely matters next to the 4096 image tokens of a 1024x1024 image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_provider_zimage.testing.tiny_model import (
    SCHEDULER_CONFIG,
    build_byte_tokenizer,
    tiny_components,
)

# Z-Image-Turbo's transformer/config.json (these are also ZImageTransformer2DModel's defaults in diffusers).
TURBO_TRANSFORMER_CONFIG: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}

# Qwen3-4B (the text encoder shipped with Z-Image); the pipeline reads its second-to-last hidden state.
QWEN3_4B_CONFIG: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
    "attention_bias": False,
}

# Flux's AutoencoderKL (16 latent channels, factor 8), which Z-Image reuses.
FLUX_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

DEFAULT_PROMPT = "A red fox in fresh snow at dawn, soft light, 35mm photo"


@contextmanager
def default_dtype(dtype: Any):
    """Create parameters directly in `dtype`: a float32 build of 10B parameters would need 40 GB first."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def real_components(device: str, dtype: Any) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype), torch.no_grad():
        transformer: Any = ZImageTransformer2DModel(**TURBO_TRANSFORMER_CONFIG)
        transformer.eval()
        if device != "meta":
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
        text_encoder = Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG)).eval()
        vae: Any = AutoencoderKL(**FLUX_VAE_CONFIG)
        vae.eval()
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "vae": vae,
        "tokenizer": build_byte_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def count_parameters(components: dict[str, Any]) -> dict[str, float]:
    """Billions of parameters per model component."""
    return {
        name: sum(p.numel() for p in module.parameters()) / 1e9
        for name, module in components.items()
        if hasattr(module, "parameters")
    }


def time_pipeline(pipe: Any, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def one(seed: int) -> dict[str, float]:
        marks: list[float] = []

        def on_step(_pipe: Any, _step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            sync()
            marks.append(time.perf_counter())
            return tensors

        sync()
        start = time.perf_counter()
        pipe(
            args.prompt,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator(device).manual_seed(seed),
            output_type="np",
            callback_on_step_end=on_step,
        )
        sync()
        end = time.perf_counter()
        steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        step = statistics.median(steps) if steps else marks[0] - start
        return {
            "total": end - start,
            "step": step,
            "before_denoise": marks[0] - start - step,  # text encoding + latent setup
            "after_denoise": end - marks[-1],  # VAE decode + postprocess
        }

    for i in range(args.warmup):
        one(1000 + i)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    runs = [one(i) for i in range(args.runs)]
    summary: dict[str, float] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    summary["min_total"] = min(r["total"] for r in runs)
    summary["max_total"] = max(r["total"] for r in runs)
    if cuda:
        summary["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test)")
    parser.add_argument(
        "--dry-run", action="store_true", help="build real-size configs on 'meta', print sizes"
    )
    parser.add_argument("--device", default=None, help="default: cuda (real) / cpu (--tiny)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (real) / float32 (--tiny)")
    parser.add_argument(
        "--size", type=int, default=None, help="image side; default 1024 (real) / 64 (--tiny)"
    )
    parser.add_argument("--steps", type=int, default=None, help="default 8 (real) / 2 (--tiny)")
    parser.add_argument("--guidance", type=float, default=0.0, help="0 = Turbo's setting (no CFG)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs; default 5 (real) / 3 (--tiny)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs; default 2 (real) / 1 (--tiny)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (real size)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    parser.add_argument("--smoke", action="store_true", help="--tiny, 1 run, 0 warm-up (make bench-smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny, args.runs, args.warmup = True, 1, 0

    import torch
    from diffusers import ZImagePipeline

    if args.dry_run:
        sizes = count_parameters(real_components("meta", torch.bfloat16))
        params = {k: round(v, 3) for k, v in sizes.items()}
        print(
            json.dumps({"mode": "dry-run", "params_billion": params})
            if args.json
            else f"real-size parameters (billions): {params}"
        )
        return {"mode": "dry-run", "params_billion": params}

    tiny = args.tiny
    device = args.device or ("cpu" if tiny else "cuda")
    dtype = getattr(torch, args.dtype or ("float32" if tiny else "bfloat16"))
    args.size = args.size or (64 if tiny else 1024)
    args.steps = args.steps or (2 if tiny else 8)
    args.runs = args.runs or (3 if tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible; use --tiny for the CPU smoke test or --dry-run to check configs")

    built = time.perf_counter()
    if tiny:
        with torch.device(device), default_dtype(dtype):
            components = tiny_components()
    else:
        components = real_components(device, dtype)
    pipe: Any = ZImagePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe.transformer.compile(fullgraph=False)
    build_s = time.perf_counter() - built

    summary = time_pipeline(pipe, args, device)
    report: dict[str, Any] = {
        "mode": "tiny" if tiny else "real",
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "build_s": round(build_s, 2),
        "params_billion": {k: round(v, 3) for k, v in count_parameters(components).items()},
        **{k: round(v, 4) for k, v in summary.items()},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"Z-Image-Turbo {report['mode']} on {report['device']} ({report['dtype']}): "
            f"{args.size}x{args.size}, {args.steps} steps, median of {args.runs} after {args.warmup} warm-up"
        )
        spread = f"min {summary['min_total']:.3f}, max {summary['max_total']:.3f}"
        print(f"  seconds per image : {summary['total']:.3f}  ({spread})")
        print(f"  per denoising step: {summary['step']:.4f}")
        print(f"  before denoising  : {summary['before_denoise']:.4f}  (text encoder + setup)")
        print(f"  after denoising   : {summary['after_denoise']:.4f}  (VAE decode + postprocess)")
        if "peak_gib" in summary:
            print(f"  peak GPU memory   : {summary['peak_gib']:.2f} GiB")
        print(f"  build             : {build_s:.1f}s  params (B): {report['params_billion']}")
    return report


if __name__ == "__main__":
    main()
