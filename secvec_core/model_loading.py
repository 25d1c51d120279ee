"""Load base models safely: Hugging Face directories (safetensors only), GGUF files, or hub ids.

Security vectors are trained against a frozen base model, so the model must load the same way
every time and must never execute code or unpickle weights that came with it:

- directories and hub ids are loaded with ``use_safetensors=True`` (pickle ``.bin`` weights are
  refused) and ``trust_remote_code=False`` unless the caller opts in;
- GGUF files are dequantized by transformers (needs the ``gguf`` package) and rebuilt as a plain
  float model, because a GGUF-loaded model is marked "quantized with gguf" and cannot be saved
  or fine-tuned like an ordinary one;
- :func:`convert_gguf_to_safetensors` writes such a model once as a safetensors directory, so
  later loads are fast and need no ``gguf`` package.

Chat models are required by the training and evaluation code; they check that with
:func:`require_chat_template` rather than at load time, so base models can still be loaded
(for fingerprints, for example).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from secvec_core.artifacts import atomic_directory

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# "owner/name" or "name" as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_gguf_file(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def _require_gguf_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a .gguf model file or a Hugging Face directory")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass a .gguf model file or a Hugging Face directory")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r}); "
            "pass a .gguf model file or a Hugging Face directory"
        )


def require_safetensors_directory(directory: Path) -> None:
    """Raise ValueError unless ``directory`` is a Hugging Face model directory with safetensors weights."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory; "
            "pass a directory written by save_pretrained, or a .gguf file"
        )
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); refusing to load them because "
            "unpickling can run arbitrary code. Convert the model to safetensors first "
            "(load it in a trusted environment and call save_pretrained(..., safe_serialization=True))."
        )
    raise ValueError(f"{directory} has no *.safetensors weights")


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless ``tokenizer`` has a chat template.

    Prompts and responses are formatted with ``apply_chat_template`` for vector training,
    fine-tuning and evaluation; a base (non-instruct) model has no template and would be
    trained on a format it never saw.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template. Pick an instruct/chat model, or set "
            "`tokenizer.chat_template` to a Jinja template (for example the one of the model family's "
            "instruct variant) before training or evaluating."
        )


def _plain_model_from(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Rebuild a GGUF-loaded model as an ordinary float model with the same weights.

    transformers marks GGUF-loaded models as quantized ("quantized with gguf and is not
    serializable"), so ``save_pretrained`` refuses them and peft treats them as quantized.
    The weights are already dequantized floats; copying them into a model built from the config
    without ``quantization_config`` gives an ordinary model.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.eval()
    return plain


def _load_gguf(path: Path, *, trust_remote_code: bool, dtype: torch.dtype):
    _require_gguf_file(path)
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError("loading a .gguf file needs the `gguf` package: pip install gguf") from error
    directory, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, trust_remote_code=trust_remote_code)
    quantized = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=dtype, trust_remote_code=trust_remote_code
    )
    model = _plain_model_from(quantized, dtype)
    del quantized
    return model, tokenizer


def _load_pretrained(source: str, *, trust_remote_code: bool, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, use_safetensors=True, dtype=dtype, trust_remote_code=trust_remote_code
    )
    model.eval()
    return model, tokenizer


def _looks_like_local_path(source: str) -> bool:
    """A string that cannot be a hub id ("name" or "owner/name") is meant as a local path."""
    return source.lower().endswith(".gguf") or not _HUB_ID.match(source)


def load_model_and_tokenizer(
    source: str | Path,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, a ``.gguf`` file or a hub id.

    ``source`` may be:

    - a Hugging Face directory (``config.json`` + ``*.safetensors``); pickle-only directories are
      refused;
    - a GGUF file (``model.gguf``), or a directory plus ``gguf_file=`` naming a file inside it;
      weights are dequantized to ``dtype`` and the model is returned as an ordinary (saveable,
      peft-compatible) model;
    - a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs hub access; safetensors
      only). With ``gguf_file=`` a GGUF file from that repository is loaded.

    The model is returned in eval mode. A tokenizer without a pad token gets its EOS token as
    pad token, so batched generation works. The chat template is not checked here; call
    :func:`require_chat_template` where one is needed.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if gguf_file is not None:
                raise ValueError(f"gguf_file={gguf_file!r} was given but {path} is a file, not a directory")
            model, tokenizer = _load_gguf(path, trust_remote_code=trust_remote_code, dtype=dtype)
        elif gguf_file is not None:
            model, tokenizer = _load_gguf(path / gguf_file, trust_remote_code=trust_remote_code, dtype=dtype)
        else:
            require_safetensors_directory(path)
            model, tokenizer = _load_pretrained(str(path), trust_remote_code=trust_remote_code, dtype=dtype)
    elif _looks_like_local_path(text):
        raise FileNotFoundError(
            f"{text} does not exist; pass an existing .gguf file, a Hugging Face model directory, "
            "or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    elif gguf_file is not None:
        logger.info("loading %s from %s on the Hugging Face hub", gguf_file, text)
        tokenizer = AutoTokenizer.from_pretrained(text, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        quantized = AutoModelForCausalLM.from_pretrained(
            text, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code
        )
        model = _plain_model_from(quantized, dtype)
    else:
        logger.info("loading %s from the Hugging Face hub", text)
        model, tokenizer = _load_pretrained(text, trust_remote_code=trust_remote_code, dtype=dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def convert_gguf_to_safetensors(
    gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32
) -> Path:
    """Dequantize a GGUF model file into a Hugging Face safetensors directory at ``out_dir``.

    Writes the model (``safe_serialization=True``), its generation config and its tokenizer,
    chat template included when the GGUF file has one. The directory is written under a
    temporary name beside ``out_dir`` and renamed when complete, so an interrupted conversion
    never leaves a loadable but incomplete ``out_dir``. An existing ``out_dir`` is replaced.
    The default float32 keeps every dequantized weight exact, so the saved model gives the same
    logits as the GGUF-loaded one.
    """
    gguf_path = Path(gguf_path).expanduser()
    out_dir = Path(out_dir).expanduser()
    _require_gguf_file(gguf_path)
    model, tokenizer = _load_gguf(gguf_path, trust_remote_code=False, dtype=dtype)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("%s has no chat template; set tokenizer.chat_template before training", gguf_path)
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    logger.info("converted %s to %s", gguf_path, out_dir)
    return out_dir
