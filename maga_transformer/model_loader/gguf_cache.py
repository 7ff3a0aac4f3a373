"""GGUF files de-quantized once (through transformers) and cached as a plain HF directory.

Parsing and de-quantizing a GGUF takes ~20 s even for a 135M model; reading the cached safetensors
takes well under a second, so every start after the first is fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

# Present only in a finished cache directory; written last inside the staging dir.
SOURCE_INFO_FILE = "maga_gguf_source.json"
_STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class GgufSource:
    """What identifies a GGUF file for caching: replacing or touching the file invalidates the cache."""
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, gguf_path: str) -> "GgufSource":
        path = os.path.abspath(gguf_path)
        stat = os.stat(path)
        return cls(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns)

    @property
    def key(self) -> str:
        raw = f"{self.path}|{self.size}|{self.mtime_ns}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


def cache_root_dir(cache_root: Optional[str] = None) -> str:
    """Explicit argument, else $MAGA_CACHE_DIR, else ~/.cache/maga_transformer."""
    root = cache_root or os.environ.get("MAGA_CACHE_DIR") or os.path.join("~", ".cache", "maga_transformer")
    return os.path.abspath(os.path.expanduser(root))


def cached_dir_for(gguf_path: str, cache_root: Optional[str] = None) -> str:
    """Where the converted directory of this GGUF lives (whether or not it exists yet)."""
    source = GgufSource.of(gguf_path)
    return os.path.join(cache_root_dir(cache_root), "gguf", f"{source.stem}-{source.key}")


def _is_complete(target: str) -> bool:
    # The directory only ever appears through an atomic rename of a finished staging dir, so its
    # existence with the marker file means a complete conversion.
    return os.path.isfile(os.path.join(target, SOURCE_INFO_FILE))


def convert_gguf_to_hf_dir(gguf_path: str, cache_root: Optional[str] = None) -> str:
    """The cached HF directory (safetensors + config + tokenizer) of a GGUF file, converting on first use."""
    if not os.path.isfile(gguf_path):
        raise ValueError(f"GGUF file {gguf_path!r} does not exist")
    source = GgufSource.of(gguf_path)
    target = cached_dir_for(gguf_path, cache_root)
    if _is_complete(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # The lock only saves a second process the duplicate ~20 s of work; correctness rests on the
    # atomic rename below, so platforms without flock still never see a half-written cache.
    with _file_lock(target + ".lock"):
        if _is_complete(target):
            return target
        _remove_stale_staging(target)
        _convert_into(source, target)
    return target


@contextlib.contextmanager
def _file_lock(lock_path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_staging(target: str) -> None:
    """Staging dirs left by a crashed conversion of this same file (we hold its lock, so none is live)."""
    parent, base = os.path.split(target)
    for name in os.listdir(parent):
        if name.startswith(f"{_STAGING_PREFIX}{base}-"):
            logger.info("removing leftover partial conversion %s", os.path.join(parent, name))
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _convert_into(source: GgufSource, target: str) -> None:
    parent, base = os.path.split(target)
    staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{base}-", dir=parent)
    try:
        seconds = _convert(source, staging)
        _write_source_info(staging, source, seconds)
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: str, target: str) -> None:
    """Atomically move the finished conversion into place; losing a race to another process is fine."""
    try:
        os.rename(staging, target)
    except OSError:
        # rename() onto an existing non-empty directory fails: someone else finished first.
        if not _is_complete(target):
            raise
        logger.info("another process already converted %s; using its copy", target)
        shutil.rmtree(staging, ignore_errors=True)


def _write_source_info(out_dir: str, source: GgufSource, seconds: float) -> None:
    import transformers
    info: Dict[str, Any] = {**asdict(source), "key": source.key, "transformers_version": transformers.__version__,
                            "torch_version": torch.__version__, "conversion_seconds": round(seconds, 2)}
    with open(os.path.join(out_dir, SOURCE_INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)


def _convert(source: GgufSource, out_dir: str) -> float:
    """De-quantize to fp32 and save model, config, generation config and tokenizer; returns seconds taken."""
    start = time.monotonic()
    logger.info("converting %s to an HF directory once (de-quantizing to float32; takes ~20 s)", source.path)
    try:
        model = _load_dequantized_model(source.path)
        tokenizer = _load_gguf_tokenizer(source.path)
    except ImportError as err:
        raise ImportError(f"reading {source.path} through transformers failed: {err}. GGUF support needs the "
                          f"`gguf` package (pip install gguf); alternatively convert on a machine that has it "
                          f"and pass the converted directory instead of the .gguf file") from err
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _ensure_chat_template(tokenizer, out_dir)
    seconds = time.monotonic() - start
    logger.info("converted %s in %.1f s", os.path.basename(source.path), seconds)
    return seconds


def _dequantize_kwargs(gguf_file: str) -> Dict[str, Any]:
    """Ask for a dense model explicitly where transformers can keep GGUF blocks packed (5.2x+ GgufConfig).

    Without it, a machine with GGUF matmul kernels installed would get packed layers that cannot be
    saved as plain safetensors.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantizes GGUF at load
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def _load_dequantized_model(gguf_path: str):
    from transformers import AutoModelForCausalLM
    folder, filename = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32,
                                                 **_dequantize_kwargs(filename))
    _drop_gguf_quantizer(model)
    return model.eval()


def _drop_gguf_quantizer(model) -> None:
    """Make the loaded model a plain dense one so save_pretrained writes ordinary safetensors.

    A leftover quantizer makes save_pretrained refuse, and a leftover `quantization_config` in
    config.json would make later loads of the cache try to read it as GGUF again.
    """
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"transformers kept GGUF weights packed ({packed}); cannot save them as dense weights")
    not_float = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if not_float:
        raise RuntimeError(f"de-quantized GGUF has non-float32 parameters: {not_float[:5]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if getattr(owner, attr, None) is not None:
            with contextlib.suppress(AttributeError):
                delattr(owner, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _load_gguf_tokenizer(gguf_path: str):
    from transformers import AutoTokenizer
    folder, filename = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    if not tokenizer.chat_template:
        logger.warning("%s carries no chat template; chat requests will need one supplied", gguf_path)
    return tokenizer


def _ensure_chat_template(tokenizer, out_dir: str) -> None:
    """Check the saved tokenizer reloads with the GGUF's chat template; write it out if it got lost."""
    template = tokenizer.chat_template
    if not template or not isinstance(template, str):
        return
    from transformers import AutoTokenizer
    if AutoTokenizer.from_pretrained(out_dir).chat_template == template:
        return
    # transformers 5 reads chat_template.jinja beside tokenizer_config.json.
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    if AutoTokenizer.from_pretrained(out_dir).chat_template != template:
        raise RuntimeError(f"the chat template of the GGUF tokenizer did not survive saving to {out_dir}")
