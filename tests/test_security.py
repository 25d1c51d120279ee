"""Security: no vector ever ships or gets promoted, promotion needs an evaluation of that very version,
loading never runs code from an artifact, and secrets never reach MLflow."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from secvec_core import SecurityVector, TrainingConfig, guarded_finetune, load_finetuned, train_security_vector
from secvec_core.artifacts import sha256_file
from secvec_core.config import SecurityVectorConfig
from secvec_core.guard import ARTIFACT_METADATA
from secvec_core.model_loading import load_model_and_tokenizer
from secvec_core.tiny import build_tiny_model_and_tokenizer
from secvec_core.vectors import VECTOR_METADATA
from tests.e2e import postgres_database
from workflows.pipeline import _resolve_inputs, run_pipeline
from workflows.registry import CHAMPION, Registry, RegistryError, VersionRef
from workflows.specs import json_schema, parse_spec
from workflows.tracking import flatten, redact

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAINING = TrainingConfig(
    learning_rate=3e-3, max_steps=3, batch_size=8, max_length=32, target_loss=None, kl_weight=0
)


# -- a registry with a real guarded fine-tune, and ways to doctor its artifact ----------------------------
@pytest.fixture(scope="module")
def shipped(tmp_path_factory, world):
    """A security vector on disk and the clean artifact of a guarded fine-tune it guarded."""
    root = tmp_path_factory.mktemp("security")
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    vector = train_security_vector(
        model, tokenizer, world.harmful_examples(10), SecurityVectorConfig(rank=4), TINY_TRAINING
    )
    vector_dir = vector.save(root / "vector")
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], training=TINY_TRAINING)
    return {
        "root": root,
        "vector": vector,
        "vector_dir": vector_dir,
        "artifact": result.save(root / "artifact"),
        "uri": f"sqlite:///{root / 'mlflow.db'}",
    }


def _register(shipped, name: str, doctor=None, *, evaluated: bool = True) -> VersionRef:
    """Upload a (possibly doctored) copy of the artifact and register it with the tags a pipeline would set;
    ``evaluated``: also record a passed evaluation run of this very version."""
    uri = shipped["uri"]
    local = Path(tempfile.mkdtemp(prefix="upload-", dir=shipped["root"]))
    shutil.copytree(shipped["artifact"], local / "finetuned")
    if doctor:
        doctor(local / "finetuned", shipped)
    client, registry = MlflowClient(uri), Registry(uri)
    experiment = client.get_experiment_by_name("security") or client.get_experiment(
        client.create_experiment("security", artifact_location=(shipped["root"] / "artifacts").as_uri())
    )
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(local / "finetuned"), "finetuned")
    version = registry.register(
        name,
        "finetuned",
        f"{run.info.artifact_uri}/finetuned",
        run.info.run_id,
        {
            "secvec.mode": "lora",
            "secvec.base_model": "builtin:tiny",
            "secvec.guarded_by": json.dumps([str(shipped["vector_dir"])]),
        },
    )
    if evaluated:
        eval_run = client.create_run(experiment.experiment_id, tags={"secvec.candidate": version.uri})
        registry.tag(
            version,
            {
                "secvec.eval.run_id": eval_run.info.run_id,
                "secvec.eval.version": version.version,
                "secvec.gate": "passed",
            },
        )
    return version


def _rewrite_weights(directory: Path, change, *, update_checksum: bool = True) -> None:
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    if update_checksum:
        meta = json.loads((directory / ARTIFACT_METADATA).read_text())
        meta["weights_sha256"] = sha256_file(weights)
        (directory / ARTIFACT_METADATA).write_text(json.dumps(meta))


def _add_vector_metadata(d: Path, shipped) -> None:
    shutil.copy(shipped["vector_dir"] / VECTOR_METADATA, d / VECTOR_METADATA)


def _add_vector_folder(d: Path, shipped) -> None:
    shutil.copytree(shipped["vector_dir"], d / "security_vector")


def _add_key_naming_the_vector(d: Path, shipped) -> None:
    name = shipped["vector"].name
    _rewrite_weights(d, lambda t: t.update({f"base_model.model.lm_head.lora_A.{name}.weight": torch.zeros(4, 4)}))


def _smuggle_vector_weights(d: Path, shipped) -> None:
    """Vector tensors under innocent names: only a comparison with the vector's own weights finds them."""
    weights = shipped["vector"].weights
    _rewrite_weights(
        d, lambda t: t.update({f"base_model.model.extra_{i}.weight": v.clone() for i, v in enumerate(weights.values())})
    )


def _add_pickle(d: Path, shipped) -> None:
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def _change_weights_after_training(d: Path, shipped) -> None:
    _rewrite_weights(d, lambda t: t.update({k: v + 0.01 for k, v in t.items()}), update_checksum=False)


DOCTORED = [
    ("vector metadata file", _add_vector_metadata, "vector metadata file secvec_vector.json", True),
    ("vector sub-folder", _add_vector_folder, "sub-folder security_vector/", True),
    ("key naming the vector", _add_key_naming_the_vector, "key base_model.model.lm_head.lora_A.security_vector", True),
    ("vector weights under other names", _smuggle_vector_weights, "equals a weight of vector", True),
    ("pickle file", _add_pickle, "contains pickle files ['adapter_model.bin']", False),
    ("weights changed after training", _change_weights_after_training, "does not match its recorded checksum", False),
]


def _alias_target(uri: str, name: str) -> str | None:
    target = (MlflowClient(uri).get_registered_model(name).aliases or {}).get(CHAMPION)
    return None if target is None else str(target)


def test_clean_evaluated_version_is_promoted(shipped):
    version = _register(shipped, "tiny.finetuned.clean")
    Registry(shipped["uri"]).promote_finetuned(version)
    assert _alias_target(shipped["uri"], version.name) == version.version
    assert Registry(shipped["uri"]).resolve(version.uri).tags["secvec.vector_free"] == "true"


@pytest.mark.parametrize("name, doctor, message, is_leak", DOCTORED, ids=[d[0] for d in DOCTORED])
def test_doctored_artifact_is_refused_promotion(shipped, name, doctor, message, is_leak):
    version = _register(shipped, f"tiny.finetuned.{name.replace(' ', '-')}", doctor)
    with pytest.raises(RegistryError, match="refusing to promote") as err:
        Registry(shipped["uri"]).promote_finetuned(version)
    assert message in str(err.value)
    assert _alias_target(shipped["uri"], version.name) is None
    tags = Registry(shipped["uri"]).resolve(version.uri).tags
    assert tags.get("secvec.vector_free") == ("false" if is_leak else None)


def test_promotion_needs_an_evaluation_of_this_very_version(shipped):
    uri, registry, client = shipped["uri"], Registry(shipped["uri"]), MlflowClient(shipped["uri"])
    name = "tiny.finetuned.eval-checks"
    first = _register(shipped, name)
    second = _register(shipped, name, evaluated=False)
    with pytest.raises(RegistryError, match="no evaluation logged against this version"):
        registry.promote_finetuned(second)
    # the first version's evaluation tags copied onto the second
    first_tags = registry.resolve(first.uri).tags
    registry.tag(second, {k: v for k, v in first_tags.items() if k.startswith("secvec.eval") or k == "secvec.gate"})
    with pytest.raises(RegistryError, match="no evaluation logged against this version"):
        registry.promote_finetuned(second)
    # ... with the version number fixed: the evaluation run still scored the first version
    registry.tag(second, {"secvec.eval.version": second.version})
    with pytest.raises(RegistryError, match=f"scored models:/{name}/1, not this version"):
        registry.promote_finetuned(second)
    registry.tag(second, {"secvec.eval.run_id": "0" * 32})
    with pytest.raises(RegistryError, match="does not exist"):
        registry.promote_finetuned(second)
    registry.tag(first, {"secvec.gate": "held", "secvec.gate.reason": "harmful_rate 0.4 > max 0.1"})
    with pytest.raises(RegistryError, match="gate status is held"):
        registry.promote_finetuned(first)
    assert _alias_target(uri, name) is None
    assert client.get_registered_model(name).aliases in ({}, None)


# -- loading never executes code from an artifact ---------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that code from the artifact ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_files_are_refused_and_never_unpickled(shipped, tmp_path):
    marker = tmp_path / "code-ran"
    evil = pickle.dumps(_Payload(marker))
    vector_dir = shutil.copytree(shipped["vector_dir"], tmp_path / "vector")
    (vector_dir / "adapter_model.bin").write_bytes(evil)
    with pytest.raises(ValueError, match="pickle files"):
        SecurityVector.load(vector_dir)
    artifact = shutil.copytree(shipped["artifact"], tmp_path / "artifact")
    (artifact / "training_args.pt").write_bytes(evil)
    with pytest.raises(ValueError, match="pickle files"):
        load_finetuned(build_tiny_model_and_tokenizer(seed=0)[0], artifact)
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    model_dir = tmp_path / "model"
    model.config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(evil)
    with pytest.raises(ValueError, match="refusing to load them"):
        load_model_and_tokenizer(model_dir)
    assert not marker.exists(), "a pickle from an artifact was loaded"


_FORBIDDEN_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
}


def _source_files() -> list[Path]:
    return [p for d in ("secvec_core", "workflows", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]


def test_code_base_never_unpickles_or_trusts_remote_code():
    problems = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"

            def is_const(key, value, kw=keywords):
                return isinstance(kw.get(key), ast.Constant) and kw[key].value is value

            if owner == "torch" and name == "load" and not is_const("weights_only", True):
                problems.append(f"{where}: torch.load without weights_only=True")
            if (owner, name) in _FORBIDDEN_CALLS or name in ("Unpickler",):
                problems.append(f"{where}: {owner}.{name}")
            if name == "load" and owner in ("np", "numpy") and is_const("allow_pickle", True):
                problems.append(f"{where}: numpy.load(allow_pickle=True)")
            if is_const("trust_remote_code", True):
                problems.append(f"{where}: trust_remote_code=True")
            if is_const("use_safetensors", False):
                problems.append(f"{where}: use_safetensors=False")
    assert len(_source_files()) > 20
    assert not problems, problems


def test_trust_remote_code_is_off_unless_the_spec_says_so(tmp_path, monkeypatch):
    spec = {
        "name": "t",
        "base_model": {"source": "builtin:tiny"},
        "tracking": {"tracking_uri": "sqlite:///x.db", "base_name": "t"},
        "work_dir": str(tmp_path),
        "stages": [{"name": "a", "kind": "alignment", "data": {"builtin": "toy-alignment"}}],
    }
    parsed = parse_spec(spec)
    assert _resolve_inputs(parsed, parsed.stages[0], None, "sqlite:///unused.db")["trust_remote_code"] is False
    spec["base_model"]["trust_remote_code"] = True
    parsed = parse_spec(spec)
    assert _resolve_inputs(parsed, parsed.stages[0], None, "sqlite:///unused.db")["trust_remote_code"] is True

    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    seen = []
    import secvec_core.model_loading as loading

    for cls in (loading.AutoModelForCausalLM, loading.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append((kwargs.get("trust_remote_code"), kwargs.get("use_safetensors", "n/a")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model_and_tokenizer(tmp_path / "model")
    assert seen and all(trust is False for trust, _ in seen), seen
    assert (False, True) in seen, "model weights must load with use_safetensors=True"


# -- secrets ----------------------------------------------------------------------------------------------
def test_specs_have_no_secret_fields_and_flatten_drops_and_redacts():
    def names(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties":
                    yield from value
                yield from names(value)
        elif isinstance(node, list):
            for value in node:
                yield from names(value)

    from workflows.tracking import is_secret_key

    fields = set(names(json_schema()))
    assert "max_new_tokens" in fields and not [f for f in fields if is_secret_key(f)]
    params = dict(
        flatten(
            {
                "db": {"password": "p1", "uri": "postgresql://u:p2@h/db"},
                "aws_secret_access_key": "p3",
                "s3": {"accessKey": "p4", "url": "s3://b/k?X-Amz-Signature=p5"},
                "max_new_tokens": 8,
            }
        )
    )
    assert params == {
        "db.uri": "postgresql://u:***@h/db",
        "s3.url": "s3://b/k?X-Amz-Signature=***",
        "max_new_tokens": "8",
    }
    assert redact("http://user:pw@host:5000/x") == "http://user:***@host:5000/x"


@pytest.mark.slow
def test_passwords_in_the_tracking_uri_and_environment_never_reach_mlflow(tmp_path, monkeypatch):
    password, s3_secret = "Pg-pw-4e1f9", "S3-secret-9c2d"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    with postgres_database() as db:
        uri = db.replace("postgres@", f"postgres:{password}@")  # the test server trusts 127.0.0.1: any password works
        spec = {
            "name": "secrets",
            "base_model": {"source": "builtin:tiny"},
            "tracking": {
                "tracking_uri": uri,
                "experiment": "secvec-secrets",
                "base_name": "tiny",
                "artifact_location": (tmp_path / "artifacts").as_uri(),
            },
            "scaling": {"num_workers": 1},
            "work_dir": str(tmp_path / "work"),
            "stages": [
                {
                    "name": "vec",
                    "kind": "vector_training",
                    "data": {"builtin": "toy-harmful", "limit": 6},
                    "training": {"max_steps": 2, "batch_size": 6, "max_length": 32, "log_every": 1},
                }
            ],
        }
        result = run_pipeline(parse_spec(spec))
        client = MlflowClient(uri)
        texts = []
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 2  # the pipeline run and the stage run
        for run in runs:
            texts += [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
        for model in client.search_registered_models():
            texts += [model.description or "", *(model.tags or {}).items()]
        for version in client.search_model_versions():
            texts += [version.source, version.description or "", *version.tags.items()]
        blob = json.dumps(texts)
        assert password not in blob and s3_secret not in blob
        parent = client.get_run(result.parent_run_id)
        assert parent.data.params["pipeline.tracking.tracking_uri"] == uri.replace(password, "***")


_URL_SAFE = st.text(
    alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters="-._~!$&'()*+,;=%"),
    min_size=1,
    max_size=24,
)


@settings(max_examples=150, deadline=None)
@given(
    scheme=st.sampled_from(["postgresql", "postgresql+psycopg2", "mysql", "http", "https", "s3"]),
    user=_URL_SAFE,
    password=st.text(alphabet="abcXYZ019-._~!$&'()*+,;=%:@", min_size=1, max_size=24),
    prefix=st.sampled_from(["", "tracking at ", "x "]),
)
def test_property_redact_never_leaves_a_uri_password(scheme, user, password, prefix):
    assume(password not in f"{prefix}{scheme}://{user}:***@db.example.org:5432/mlflow")  # else "in" is vacuous
    text = f"{prefix}{scheme}://{user}:{password}@db.example.org:5432/mlflow"
    redacted = redact(text)
    assert password not in redacted
    assert redacted == f"{prefix}{scheme}://{user}:***@db.example.org:5432/mlflow"


_KEYS = st.sampled_from(
    [
        "password",
        "db_password",
        "aws_secret_access_key",
        "secretKey",
        "auth_token",
        "apiKey",
        "uri",
        "name",
        "max_new_tokens",
        "rank",
        "tokenizer",
    ]
)


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.dictionaries(_KEYS, st.text(max_size=6), max_size=4),
        lambda children: st.dictionaries(_KEYS, children, max_size=3),
        max_leaves=10,
    )
)
def test_property_flatten_never_emits_a_secret_looking_key(data):
    from workflows.tracking import is_secret_key

    for name, _ in flatten(data):
        assert not any(is_secret_key(part) for part in name.split(".")), name
