"""The MLflow Model Registry layout of secvec, and its promotion gate.

Registered models (``<base>`` is ``tracking.base_name``):
  ``<base>.aligned``                      full weights from an alignment stage
  ``<base>.security-vector.<behaviour>``  security vectors, one version per training run
  ``<base>.finetuned.<stage>``            shipped fine-tuned artifacts (task adapter or full weights)
Every version carries lineage tags; ``champion`` is the alias a promotion sets.

Writes are safe to repeat and to race: a run registers at most one version per registered model (a retry finds
the version an earlier attempt created), and an alias is moved only if nobody else moved it since this run
looked (MLflow has no compare-and-set, so the alias is read before and after the move and a conflict is an
error naming the other version, never a silent overwrite).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workflows.specs import REGISTRY_URI
from workflows.tracking import configure_http_retries, create_once, redact, with_retries

KIND_TAG = "secvec.kind"
CHAMPION = "champion"


class RegistryError(ValueError):
    """A registry reference that cannot be resolved, or a promotion the gate refuses."""


class AliasConflictError(RegistryError):
    """Another run moved the alias between this run's look and its move; this run did not overwrite it."""


_ANY = object()  # set_alias without an expected previous version


@dataclass
class VersionRef:
    name: str
    version: str
    source: str
    run_id: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def vector_model_name(base_name: str, behaviour: str) -> str:
    return f"{base_name}.security-vector.{behaviour}"


def finetuned_model_name(base_name: str, stage: str) -> str:
    return f"{base_name}.finetuned.{stage}"


def aligned_model_name(base_name: str) -> str:
    return f"{base_name}.aligned"


class Registry:
    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        configure_http_retries()
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)

    def _call(self, fn, what: str):
        return with_retries(fn, what, self.tracking_uri)

    def resolve(self, uri: str) -> VersionRef:
        """``models:/name/3`` or ``models:/name@alias`` -> version, with one-line errors naming the fix."""
        from mlflow.exceptions import MlflowException

        match = REGISTRY_URI.match(uri)
        if not match:
            raise RegistryError(f"bad registry URI {uri!r}; use models:/<name>@<alias> or models:/<name>/<version>")
        name, version, alias = match["name"], match["version"], match["alias"]
        try:
            self._call(lambda: self.client.get_registered_model(name), f"look up {name}")
        except MlflowException:
            raise RegistryError(
                f"{uri}: no registered model named {name!r} at {redact(self.tracking_uri)}; "
                "run the stage that registers it, or fix the name (see `secvec registry list`)"
            ) from None
        try:
            if alias:
                mv = self._call(lambda: self.client.get_model_version_by_alias(name, alias), f"resolve {uri}")
            else:
                mv = self._call(lambda: self.client.get_model_version(name, version), f"resolve {uri}")
        except MlflowException:
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise RegistryError(
                f"{uri}: registered model {name!r} has no {what}; promote a version first "
                "or use models:/<name>/<version>"
            ) from None
        return VersionRef(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}))

    def register(
        self, name: str, kind: str, source: str, run_id: str, tags: dict[str, str], description: str = ""
    ) -> VersionRef:
        """Create a version whose artifacts are already uploaded; tags are set in the same call, so a
        version never exists without its lineage."""
        from mlflow.exceptions import MlflowException

        try:
            self._call(
                lambda: self.client.create_registered_model(name, tags={KIND_TAG: kind}, description=description),
                f"create {name}",
            )
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {k: str(v) for k, v in tags.items()}
        existing = self.find_version(name, run_id)  # a restarted worker, or a create whose reply was lost
        if existing is not None:
            return existing
        mv = create_once(
            lambda: self.client.create_model_version(name, source=source, run_id=run_id, tags=tags),
            lambda: self.find_version(name, run_id),
            f"register a version of {name}",
            self.tracking_uri,
        )
        return VersionRef(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or tags))

    def find_version(self, name: str, run_id: str):
        """The version of ``name`` registered from ``run_id`` (a stage run registers at most one), or None."""
        versions = self._call(
            lambda: self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"),
            f"look up versions of {name}",
        )
        if not versions:
            return None
        mv = min(versions, key=lambda m: int(m.version))
        return VersionRef(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}))

    def alias_target(self, name: str, alias: str = CHAMPION) -> str | None:
        """The version number ``name@alias`` points at now, or None."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self._call(lambda: self.client.get_registered_model(name), f"look up {name}")
        except MlflowException:
            return None
        target = (rm.aliases or {}).get(alias)
        return None if target is None else str(target)

    def tag(self, version: VersionRef, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call(
                lambda k=k, v=v: self.client.set_model_version_tag(version.name, version.version, k, str(v)),
                f"tag {version.uri}",
            )

    def set_alias(self, version: VersionRef, alias: str = CHAMPION, expected=_ANY) -> None:
        """Point ``alias`` at ``version``. With ``expected`` (the version number the alias pointed at when the
        caller looked, or None), refuse if another run has moved it since. The alias is read back afterwards,
        so a move that raced with another run's move is reported instead of claimed."""
        if expected is not _ANY:
            now = self.alias_target(version.name, alias)
            if now not in (expected, version.version):
                raise AliasConflictError(
                    f"{version.uri}: not made {alias}: another run moved {version.name}@{alias} from "
                    f"{_describe_version(expected)} to version {now} after this run looked; not overwriting it "
                    "(rerun the pipeline to evaluate and promote this version against the new one)"
                )
        self._call(
            lambda: self.client.set_registered_model_alias(version.name, alias, version.version),
            f"set alias {alias} on {version.uri}",
        )
        after = self.alias_target(version.name, alias)
        if after != version.version:
            raise AliasConflictError(
                f"{version.uri}: not {alias}: another run moved {version.name}@{alias} to "
                f"version {after} at the same moment"
            )

    def promote_finetuned(self, version: VersionRef, alias: str = CHAMPION) -> None:
        """Promote a fine-tuned version only if an evaluation run of this very version is recorded and its
        artifact holds no vector content."""
        from mlflow.exceptions import MlflowException

        looked = self.alias_target(version.name, alias)  # compare-and-set against this, after the slow checks
        current = self.resolve(version.uri)
        eval_run_id = current.tags.get("secvec.eval.run_id")
        if current.tags.get("secvec.eval.version") != version.version or not eval_run_id:
            raise RegistryError(f"{version.uri}: refusing to promote: no evaluation logged against this version")
        try:
            scored = self._call(lambda: self.client.get_run(eval_run_id), "look up the evaluation run")
        except MlflowException:
            raise RegistryError(
                f"{version.uri}: refusing to promote: evaluation run {eval_run_id} does not exist; "
                "run an evaluation stage on this version"
            ) from None
        if scored.data.tags.get("secvec.candidate") != current.uri:
            raise RegistryError(
                f"{version.uri}: refusing to promote: evaluation run {eval_run_id} scored "
                f"{scored.data.tags.get('secvec.candidate', 'no candidate')}, not this version; "
                "run an evaluation stage on this version"
            )
        if current.tags.get("secvec.gate") != "passed":
            raise RegistryError(
                f"{version.uri}: refusing to promote: gate status is "
                f"{current.tags.get('secvec.gate', 'unset')} ({current.tags.get('secvec.gate.reason', '')})"
            )
        self.check_vector_free(current)
        self.set_alias(current, alias, expected=looked)

    def check_vector_free(self, version: VersionRef) -> None:
        """Refuse an artifact that is not exactly what a guarded fine-tune ships: a pickle file, weights that
        differ from the recorded checksum, vector files or keys, or a tensor equal to a weight of one of the
        vectors that guarded it (``secvec.guarded_by``)."""
        import mlflow.artifacts

        from secvec_core.artifacts import refuse_pickle_files, sha256_file
        from secvec_core.inference import VectorLeakError, assert_no_vector, read_artifact_metadata
        from workflows.models import load_vector

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, dst_path=tmp, tracking_uri=self.tracking_uri
                )
            )
            try:
                refuse_pickle_files(local)
                meta = read_artifact_metadata(local)
                if sha256_file(local / meta["weights_file"]) != meta["weights_sha256"]:
                    raise ValueError(
                        f"{meta['weights_file']} does not match its recorded checksum (modified "
                        "after training); retrain and re-evaluate"
                    )
                vectors = [
                    load_vector(ref, self.tracking_uri, str(Path(tmp) / "vectors"))
                    for ref in json.loads(version.tags.get("secvec.guarded_by", "[]"))
                ]
                assert_no_vector(local, vectors)
            except VectorLeakError as err:
                self.tag(version, {"secvec.vector_free": "false"})
                raise RegistryError(f"{version.uri}: refusing to promote: {err}") from None
            except (ValueError, FileNotFoundError, KeyError) as err:
                raise RegistryError(f"{version.uri}: refusing to promote: {err}") from None
        self.tag(version, {"secvec.vector_free": "true"})

    def list_models(self) -> list[dict]:
        """Every secvec registered model with its versions, aliases and lineage tags."""
        rows = []
        models = self._call(lambda: self.client.search_registered_models(max_results=1000), "list models")
        for rm in models:
            kind = (rm.tags or {}).get(KIND_TAG)
            if not kind:
                continue
            aliases: dict[str, list[str]] = {}
            for alias, v in (rm.aliases or {}).items():
                aliases.setdefault(str(v), []).append(alias)
            versions = self._call(lambda n=rm.name: self.client.search_model_versions(f"name='{n}'"), "list versions")
            for mv in sorted(versions, key=lambda m: int(m.version)):
                rows.append(
                    {
                        "name": rm.name,
                        "kind": kind,
                        "version": str(mv.version),
                        "aliases": aliases.get(str(mv.version), []),
                        "tags": dict(mv.tags or {}),
                        "run_id": mv.run_id,
                    }
                )
        return rows


def _describe_version(version: str | None) -> str:
    return "no version" if version is None else f"version {version}"
