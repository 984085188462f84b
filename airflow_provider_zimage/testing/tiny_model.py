"""A tiny, random, fully offline Z-Image checkpoint.

Real Z-Image weights are ~20 GB and cannot be downloaded in CI (no hub access), yet the local backend must be
exercised through its *real* loading path (`ZImagePipeline.from_pretrained(folder, local_files_only=True)`),
not through mocks. So this module builds every component from config with the shapes diffusers' own Z-Image
tests use (32-dim transformer, 16-channel 2-block VAE, 16-dim Qwen3 text encoder), writes them with
`save_pretrained`, and the result loads exactly like the published checkpoint. A 64x64 image takes tens of
milliseconds on a CPU.

The tokenizer is a byte-level BPE with no merges (256 byte tokens + Qwen's special tokens), built in memory:
the pipeline only needs `apply_chat_template` and padding to work, not a meaningful vocabulary.

torch/diffusers/transformers are imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

#: Written last by `build_tiny_zimage`; its presence means the folder is complete.
MARKER = ".tiny-zimage-complete"
#: Bumped whenever the configs below change, so a stale folder is rebuilt rather than reused.
BUILD_VERSION = 2

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3-style template, reduced to what ZImagePipeline calls it with (one user message,
# add_generation_prompt=True, enable_thinking=True).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}{%- endif -%}"
)

TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 16,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [8, 4, 4],
    # As published: axis 0 holds caption positions (up to 512 tokens + padding) then the image's; axes 1-2
    # the patch grid, so 512 allows any size the API accepts (2048 px / 2 / 2 with this 2x VAE).
    "axes_lens": [1024, 512, 512],
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}

TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 512,  # >= 256 bytes + special tokens
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
}

# Z-Image-Turbo's published scheduler config (static shift 3, no resolution-dependent shifting).
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def build_byte_tokenizer() -> Any:
    """A Qwen2Tokenizer over raw bytes, so `apply_chat_template` and max-length padding behave as upstream."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    # The 256 printable stand-ins GPT-2/Qwen byte-level BPE uses for bytes, in byte order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character (printable bytes map to themselves)."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """The five pipeline components, random but deterministic for `seed` (used by `--tiny` benches too)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer: Any = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        # Kept at zeros these make every padded token identical; upstream loads real values. diffusers'
        # tests set ones, and a checkpoint saved with uninitialised memory here would give NaN images.
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(seed + 1)
    vae: Any = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3Model(Qwen3Config(**TINY_TEXT_ENCODER_CONFIG)).eval()
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": build_byte_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def tiny_pipeline(seed: int = 0) -> Any:
    """An in-memory ZImagePipeline over `tiny_components` (no files written)."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(**tiny_components(seed))


def is_built(path: str | os.PathLike[str]) -> bool:
    """True when `path` holds a complete tiny checkpoint of the current BUILD_VERSION."""
    marker = Path(path) / MARKER
    try:
        return bool(json.loads(marker.read_text())["version"] == BUILD_VERSION)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_tiny_zimage(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the tiny checkpoint to `path` (a diffusers folder) unless a complete one is already there.

    The folder is written under a temporary sibling and renamed into place, so a crash or a concurrent
    builder (pytest-xdist workers, `make demo` racing a test) never leaves a half-written folder that
    `from_pretrained` would then fail on.
    """
    target = Path(path)
    if is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
        (staging / MARKER).write_text(json.dumps({"version": BUILD_VERSION, "seed": seed}))
        if target.exists():
            if is_built(target):  # another process won the race
                return target
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not is_built(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_lora(
    model_path: str | os.PathLike[str], path: str | os.PathLike[str], *, seed: int = 0
) -> Path:
    """Write a random rank-4 LoRA for the tiny transformer in diffusers' format; returns the weights file.

    Built with peft on the attention projections (what real Z-Image LoRAs target) and saved with
    `ZImagePipeline.save_lora_weights`, so loading it exercises the same code path as a downloaded LoRA.
    `init_lora_weights=False` makes both LoRA matrices random: a zero-initialised LoRA would be a no-op
    and could not show that the adapter was applied, nor that it was removed afterwards.
    """
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    target = Path(path)
    weights = target / "pytorch_lora_weights.safetensors"
    if weights.is_file():
        return weights
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel.from_pretrained(
        Path(model_path) / "transformer", local_files_only=True
    )
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    transformer.add_adapter(config)
    target.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(target, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return weights


def build_tiny_controlnet(
    model_path: str | os.PathLike[str], path: str | os.PathLike[str], *, seed: int = 0
) -> Path:
    """Write a random ControlNet for the tiny transformer as a diffusers folder; returns the folder.

    Shaped like the Z-Image-Turbo Fun ControlNet Union (control blocks beside transformer layers, a
    16-channel control input) at the tiny model's sizes, and saved with `save_pretrained`, so loading it
    takes the same `ZImageControlNetModel.from_pretrained` path as converted real weights. Its
    `before_proj`/`after_proj` layers start at zero in diffusers (a fresh ControlNet is a no-op); here
    they are random, so the guide image visibly changes the picture and a test can see it was applied.
    """
    import torch
    from diffusers import ZImageControlNetModel

    target = Path(path)
    if (target / "config.json").is_file():
        return target
    transformer = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
    torch.manual_seed(seed)
    controlnet: Any = ZImageControlNetModel(
        control_layers_places=[0],
        control_in_dim=transformer["in_channels"],
        all_patch_size=transformer["all_patch_size"],
        all_f_patch_size=transformer["all_f_patch_size"],
        dim=transformer["dim"],
        n_refiner_layers=transformer["n_refiner_layers"],
        n_heads=transformer["n_heads"],
        n_kv_heads=transformer["n_kv_heads"],
        norm_eps=transformer["norm_eps"],
        qk_norm=transformer["qk_norm"],
    )
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if "before_proj" in name or "after_proj" in name:
                parameter.normal_(0.0, 0.5)
    target.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(target, safe_serialization=True)
    return target


def main() -> None:
    """`python -m airflow_provider_zimage.testing.tiny_model DIR` builds the checkpoint into DIR."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    args = parser.parse_args()
    print(build_tiny_zimage(args.path))


if __name__ == "__main__":
    main()
