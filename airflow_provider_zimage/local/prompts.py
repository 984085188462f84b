"""Prompts longer than the text encoder reads are refused, not cut.

diffusers' Z-Image pipelines wrap a prompt in Qwen's chat template and tokenize it with
`max_length=512, truncation=True` (`max_sequence_length`): every token past 512 is dropped without a
word, so two prompts that differ only after ~500 tokens make the same image. Runware's pages allow
3000 characters and do not say what their encoder does past its limit; the local backends refuse such
a prompt, naming `positivePrompt` (or `negativePrompt`, when guidance uses it) and the limit, before
anything is denoised. The count is the pipeline's own: its tokenizer (a few MB, loaded from the
checkpoint's `tokenizer/` folder without the transformer) over the same templated text.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow_provider_zimage.exceptions import ZImageError
from airflow_provider_zimage.local.refusals import issue, raise_issues

if TYPE_CHECKING:
    from airflow_provider_zimage.local.planning import Plan

__all__ = ["TOKEN_LIMIT", "check_prompt_lengths", "count_tokens", "load_tokenizer"]

#: `max_sequence_length` of diffusers' ZImagePipeline / Img2Img / Inpaint (the default the backends use).
TOKEN_LIMIT = 512
_TOKENIZER_KWARGS = ("revision", "cache_dir", "token")
_TOKENIZERS: dict[tuple[str, bool], Any] = {}
_LOCK = threading.Lock()


def load_tokenizer(source: str, *, local_files_only: bool, from_pretrained_kwargs: Mapping[str, Any]) -> Any:
    """The checkpoint's tokenizer, once per process and source (the transformer is not loaded)."""
    key = (source, local_files_only)
    with _LOCK:
        tokenizer = _TOKENIZERS.get(key)
        if tokenizer is None:
            import transformers

            kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _TOKENIZER_KWARGS}
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    source, subfolder="tokenizer", local_files_only=local_files_only, **kwargs
                )
            except (OSError, ValueError) as exc:  # as a pipeline that cannot load: not the request's fault
                raise ZImageError(f"Could not load the Z-Image tokenizer from {source!r}: {exc}") from exc
            _TOKENIZERS[key] = tokenizer
        return tokenizer


def count_tokens(tokenizer: Any, prompt: str) -> int:
    """Tokens of `prompt` as the pipeline feeds them to the text encoder (chat template included)."""
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    return len(tokenizer(templated, truncation=False)["input_ids"])


def check_prompt_lengths(tokenizer: Any, plan: Plan) -> None:
    """Refuse (ZImageValidationError) a prompt the text encoder would cut at `TOKEN_LIMIT` tokens.

    The negative prompt counts only when guidance is on: with guidance off (CFGScale <= 1) it is not
    encoded at all (planning drops it).
    """
    issues = []
    for parameter, text in (("positivePrompt", plan.prompt), ("negativePrompt", plan.negative_prompt)):
        if not text:
            continue
        tokens = count_tokens(tokenizer, text)
        if tokens > TOKEN_LIMIT:
            message = (
                f"is {tokens} tokens long (with the chat template the text encoder wraps it in); the "
                f"text encoder reads at most {TOKEN_LIMIT} tokens (max_sequence_length) and would drop "
                "the rest without a word: shorten it"
            )
            issues.append(issue(parameter, message, text))
    raise_issues(issues)
