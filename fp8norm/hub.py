"""Hugging Face Hub model ids as checkpoint sources: `fp8norm quantize Qwen/Qwen3-8B DST`.

A local path always wins: SRC is looked up on the Hub only when no such file or directory exists and
it has the form `org/name`. huggingface_hub's `snapshot_download` does the rest: its cache
(HF_HOME / HF_HUB_CACHE; a cached snapshot is never fetched again), its progress bars, HF_HUB_OFFLINE
(cache only), tokens. Only the files a checkpoint needs are fetched: weights, index, config,
generation config, tokenizer and chat template.
"""

from __future__ import annotations

import re
from pathlib import Path

# What `quantize`/`convert` read or copy; the rest of a repo (other formats, images, ...) is skipped.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "*.tiktoken", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
]
# org/name: the Hub's own rule for repo names (letters, digits, '-', '_', '.'), exactly one slash.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubError(ValueError):
    """SRC is neither a local path nor a Hub model id that could be fetched (one line, naming it)."""


def is_repo_id(src: str) -> bool:
    return bool(REPO_ID.match(src)) and ".." not in src and not src.endswith((".json", ".safetensors"))


def resolve(src: str | Path, revision: str | None = None, *, what: str = "SRC") -> Path:
    """A local path as it is; else the local snapshot of Hub model id `src` at `revision` (a branch, tag
    or commit; default main), downloaded into huggingface_hub's cache if needed."""
    path = Path(src).expanduser()
    if path.exists():
        if revision is not None:
            raise HubError(f"{src}: --revision applies to Hub model ids, and {what} is a local path")
        return path
    if not is_repo_id(str(src)):
        raise HubError(f"{src}: no such file or directory (and not a Hub model id org/name)")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise HubError(f"{src}: not a local path; Hub model ids need huggingface_hub: "
                       "pip install 'fp8norm[hub]'") from None
    at = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(str(src), revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the id
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{src}: not a local path, and Hub model {src}{at} is not in the local cache {cache} "
                           "(HF_HUB_OFFLINE is set: nothing is fetched)") from None
        if unreachable(e):
            raise HubError(f"{src}: not a local path, and the Hugging Face Hub ({constants.ENDPOINT}) could not be "
                           f"reached to fetch {src}{at}; with HF_HUB_OFFLINE=1 the local cache {cache} is used "
                           "alone") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{src}: not a local path, and Hub model {src}{at} could not be fetched: "
                       f"{type(e).__name__}: {reason}") from None


def unreachable(error: BaseException) -> bool:
    """The Hub could not be reached (no network, DNS, refused, timed out), as opposed to a missing repo
    or revision: huggingface_hub reports it as LocalEntryNotFoundError (nothing cached either) or lets
    the HTTP client's connection error through."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in ("LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ConnectionError",
                                    "ProxyError", "ReadTimeout") or isinstance(error, (ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False
