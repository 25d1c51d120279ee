"""Spec validation: every shipped example is valid; bad specs fail with their field path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from workflows.cli import app
from workflows.specs import SpecError, json_schema, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "workflows" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid_and_says_how_to_run_it(path):
    assert path.read_text().startswith("# "), "each example starts with a comment giving its command"
    assert "secvec " in path.read_text().splitlines()[0]
    load_spec(path)


def _demo() -> dict:
    return yaml.safe_load((ROOT / "workflows" / "examples" / "demo.yaml").read_text())


def _mutate(fn):
    data = copy.deepcopy(_demo())
    fn(data)
    return data


BAD = [
    ("unknown key", lambda d: d["tracking"].update(experimnt="x"), "tracking.experimnt", "unknown key"),
    ("wrong type", lambda d: d["scaling"].update(num_workers="two"), "scaling.num_workers", "valid integer"),
    (
        "negative workers",
        lambda d: d["scaling"].update(num_workers=-1),
        "scaling.num_workers",
        "greater than or equal to 1",
    ),
    (
        "missing stage input",
        lambda d: d["stages"][3]["vectors"].__setitem__(0, {"stage": "nope"}),
        "stages[3] (guarded-finetune).vectors[0].stage",
        "not an earlier stage",
    ),
    (
        "stage of the wrong kind",
        lambda d: d["stages"][3]["vectors"].__setitem__(0, {"stage": "align"}),
        "vectors[0].stage",
        "alignment stage",
    ),
    ("missing key", lambda d: d["stages"][0].pop("data"), "stages.0.data", "add this key"),
    (
        "threshold above 1",
        lambda d: d["stages"][5]["gate"].update(max_harmful_rate=1.5),
        "stages.5.gate.max_harmful_rate",
        "less than or equal to 1",
    ),
    (
        "threshold below 0",
        lambda d: d["stages"][5]["gate"].update(min_task_metric=-0.1),
        "stages.5.gate.min_task_metric",
        "greater than or equal to 0",
    ),
    ("unknown stage kind", lambda d: d["stages"][0].update(kind="magic"), "stages.0", "kind must be one of"),
    (
        "bad registry uri",
        lambda d: d["stages"][3]["vectors"].__setitem__(0, {"uri": "models:/x@"}),
        "vectors.0",
        "bad registry URI",
    ),
    ("two sources", lambda d: d["stages"][0]["data"].update(path="x.jsonl"), "stages.0.data", "exactly one"),
    ("duplicate stage", lambda d: d["stages"].append(copy.deepcopy(d["stages"][0])), "stages[6]", "duplicate"),
]


@pytest.mark.parametrize("name, mutate, path, message", BAD, ids=[b[0] for b in BAD])
def test_bad_specs_name_the_field_path(name, mutate, path, message):
    with pytest.raises(SpecError) as err:
        parse_spec(_mutate(mutate), "bad.yaml")
    text = str(err.value)
    assert path in text and message in text, text


def test_cli_validate_reports_errors_with_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_mutate(lambda d: d["tracking"].update(experimnt="x"))))
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "tracking.experimnt" in result.output
    good = CliRunner().invoke(app, ["validate", str(EXAMPLES[0])])
    assert good.exit_code == 0 and "ok" in good.output


def test_cli_validate_missing_file_and_non_mapping(tmp_path):
    assert "spec file not found" in CliRunner().invoke(app, ["validate", str(tmp_path / "x.yaml")]).output
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "must be a YAML mapping" in CliRunner().invoke(app, ["validate", str(listy)]).output


def test_schema_export_is_json_schema(tmp_path):
    schema = json_schema()
    assert schema["additionalProperties"] is False and "stages" in schema["properties"]
    out = tmp_path / "schema.json"
    assert CliRunner().invoke(app, ["schema", "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["title"] == "PipelineSpec"


_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=8))


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(["tracking", "scaling", "base_model"]), key=_keys, value=_values)
def test_property_unknown_keys_are_always_rejected(section, key, value):
    data = _demo()
    if key in data[section] or key in _known_fields(section):
        return
    data[section][key] = value
    with pytest.raises(SpecError, match=key):
        parse_spec(data)


def _known_fields(section: str) -> set[str]:
    props = json_schema()["$defs"]
    name = {"tracking": "TrackingSpec", "scaling": "ScalingSpec", "base_model": "ModelRef"}[section]
    return set(props[name]["properties"])


@settings(max_examples=100, deadline=None)
@given(workers=st.integers(-10, 10), rate=st.floats(-2, 2, allow_nan=False))
def test_property_numeric_bounds(workers, rate):
    data = _demo()
    data["scaling"]["num_workers"] = workers
    data["stages"][5]["gate"]["max_harmful_rate"] = rate
    if workers >= 1 and 0 <= rate <= 1:
        parse_spec(data)
    else:
        with pytest.raises(SpecError):
            parse_spec(data)


@settings(max_examples=60, deadline=None)
@given(st.recursive(_values, lambda c: st.lists(c, max_size=3) | st.dictionaries(_keys, c, max_size=3), max_leaves=8))
def test_property_arbitrary_yaml_never_crashes_the_parser(data):
    try:
        parse_spec(data)
    except SpecError as err:
        assert str(err)


def test_local_content_digests_follow_edits_of_data_files_and_model_directories(tmp_path):
    import os

    from workflows.content_digests import local_content_digests

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"0" * 16)
    stage = parse_spec(
        {
            "name": "t",
            "base_model": {"source": str(model)},
            "tracking": {"tracking_uri": "sqlite:///x.db", "base_name": "t"},
            "work_dir": str(tmp_path),
            "stages": [{"name": "ft", "kind": "guarded_finetune", "data": {"path": str(data)}}],
        }
    ).stages[0]
    inputs = {"base": str(model), "vectors": ["models:/v/1"], "candidate": None}
    before = local_content_digests(stage, inputs)
    assert set(before) == {str(data.resolve()), str(model.resolve())}
    assert local_content_digests(stage, inputs) == before  # stable when nothing changed
    data.write_text('{"prompt": "a", "response": "c"}\n')  # same size, new content
    after_data = local_content_digests(stage, inputs)
    assert after_data[str(data.resolve())] != before[str(data.resolve())]
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten weights
    assert local_content_digests(stage, inputs)[str(model.resolve())] != after_data[str(model.resolve())]


def test_routing_spec_reaches_the_label_refuses_bad_stages_and_leaves_old_hashes_alone():
    """Parse-time refusals (no vectors, folding demanded), the words in the registry tag and the report, and the
    stage hash: a stage without routing hashes as it did before the option existed, so finished runs are reused."""
    from pydantic import ValidationError

    from workflows.evaluate import guard_label
    from workflows.specs import GuardedFinetuneStage, VectorRoutingSpec

    stage = {"name": "ft", "kind": "guarded_finetune", "data": {"builtin": "toy-facts"}, "vectors": [{"stage": "vec"}]}
    plain = GuardedFinetuneStage.model_validate(stage)
    assert "vector_routing" not in plain.hash_fields() and plain.hash_fields()["vectors"]
    routed = GuardedFinetuneStage.model_validate({**stage, "vector_routing": {"min_gain": 1}})
    assert routed.hash_fields()["vector_routing"] == {"min_gain": 1.0}
    assert routed.vector_routing.build().min_gain == 1.0
    with pytest.raises(ValidationError, match="needs vectors"):
        GuardedFinetuneStage.model_validate({**stage, "vectors": [], "vector_routing": {}})
    with pytest.raises(ValidationError, match="cannot be folded"):
        GuardedFinetuneStage.model_validate({**stage, "vector_routing": {}, "folding": {"fold": True}})
    with pytest.raises(ValidationError):
        VectorRoutingSpec(min_gain=float("inf"))
    tags = {
        "secvec.guarded_by": json.dumps(["models:/b.security-vector.harmful/1"]),
        "secvec.vector_routing": VectorRoutingSpec().label(),
    }
    assert guard_label(tags) == (
        "vectors b.security-vector.harmful/1 + routing (rows gaining < 0.5 nats/token train vectors off)"
    )


def test_vector_anchor_is_hashed_only_when_set_and_refuses_a_non_positive_weight():
    """A vector stage without an anchor hashes as it did before the option existed (finished vectors are reused);
    with one, the anchor's data and weight are part of the hash; a zero weight is refused at parse time."""
    from pydantic import ValidationError

    from workflows.specs import VectorTrainingStage, dataset_refs

    stage = {"name": "vec", "kind": "vector_training", "data": {"builtin": "toy-harmful"}}
    plain = VectorTrainingStage.model_validate(stage)
    assert "anchor" not in plain.hash_fields()
    anchored = VectorTrainingStage.model_validate({**stage, "anchor": {"data": {"stage": "facts"}}})
    assert anchored.hash_fields()["anchor"]["weight"] == 1.0
    assert anchored.hash_fields()["anchor"]["data"]["stage"] == "facts"
    assert any(ref.stage == "facts" for _, ref in dataset_refs(anchored))  # the pipeline waits for that stage
    with pytest.raises(ValidationError, match="greater than 0"):
        VectorTrainingStage.model_validate({**stage, "anchor": {"data": {"builtin": "toy-facts"}, "weight": 0}})
