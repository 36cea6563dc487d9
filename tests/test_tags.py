"""MLflow tag keys are written and searched through `pipeline.core.contracts.Tags` only.

A key spelled as a literal (`set_tag("stage", ...)`, `tags={"tonetune.role": ...}`,
`filter_string="tags.grid = 'x'"`) drifts from the one its reader uses, silently: the search then
finds nothing. This scan of pipeline/ and registry/ fails on any literal that equals a key
`Tags` defines, in a tag call, a `tags=` mapping or an MLflow filter string.
"""

from __future__ import annotations

import ast
import re

from pipeline.core.contracts import Tags
from tests.conftest import REPO_ROOT

TAG_CALLS = {"set_tag", "set_tags", "set_experiment_tag", "set_model_version_tag", "set_registered_model_tag"}
FILTER = re.compile(r"tags\.`?([A-Za-z0-9_.\-]+)`?\s*(=|!=|LIKE|ILIKE|IN\b)", re.IGNORECASE)


def tag_keys() -> set[str]:
    """Every full key Tags defines (prefixes such as `dataset.` are not keys on their own)."""
    return {value for name, value in vars(Tags).items()
            if name.isupper() and isinstance(value, str) and not value.endswith(".")}


def literal_tag_keys(source: str, keys: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each literal tag key in `source` that Tags defines."""
    found = []

    def literal(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    def check_mapping(node) -> None:
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if key is not None and literal(key) in keys:
                    found.append((key.lineno, f"tag mapping key {literal(key)!r}"))

    tree = ast.parse(source)
    in_fstrings = {id(value) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for value in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in TAG_CALLS and node.args and literal(node.args[0]) in keys:
                found.append((node.lineno, f"{name}({literal(node.args[0])!r}, ...)"))
            if name in TAG_CALLS or name == "start_run":  # our tracking wrappers pass tags positionally
                for argument in node.args:
                    check_mapping(argument)
            for keyword in node.keywords:
                if keyword.arg == "tags":
                    check_mapping(keyword.value)
        if isinstance(node, ast.Assign) and literal(node.value) in keys:  # GRID_ROLE_TAG = "tonetune.role"
            targets = [target.id for target in node.targets if isinstance(target, ast.Name)]
            if any(target.endswith("_TAG") for target in targets):
                found.append((node.lineno, f"{targets[0]} = {literal(node.value)!r}"))
        parts = ([node] if isinstance(node, ast.Constant) and id(node) not in in_fstrings else
                 [value for value in node.values if isinstance(value, ast.Constant)]
                 if isinstance(node, ast.JoinedStr) else [])
        for part in parts:
            if isinstance(part.value, str):
                for match in FILTER.finditer(part.value):
                    if match.group(1) in keys:
                        found.append((part.lineno, f"filter on tags.{match.group(1)}"))
    return found


def test_the_scan_catches_each_kind_of_literal_key():
    keys = {"stage", "tonetune.role", "grid"}
    source = ('mlflow.set_tag("stage", "x")\n'
              'mlflow.set_tags({"tonetune.role": "train"})\n'
              'mlflow.start_run(tags={"stage": "judge", "other": 1})\n'
              'search(filter_string="tags.grid = \'a\'")\n'
              "search(filter_string=f\"tags.`tonetune.role` = '{x}'\")\n"
              'mlflow.set_tags({Tags.STAGE: "ok"})\n'
              "search(filter_string=f\"tags.{Tags.STAGE} = 'ok'\")\n"
              'GRID_ROLE_TAG = "tonetune.role"\n'
              'start_run(config, name, None, {"stage": "openai_finetune"})\n')
    assert sorted(line for line, _ in literal_tag_keys(source, keys)) == [1, 2, 3, 4, 5, 8, 9]


def test_no_module_spells_a_tags_key_as_a_literal():
    keys = tag_keys()
    assert {"stage", "tonetune.role", "grid"} <= keys
    offenders = []
    for path in sorted([*(REPO_ROOT / "pipeline").rglob("*.py"), *(REPO_ROOT / "registry").rglob("*.py")]):
        if path.name == "contracts.py":
            continue
        offenders += [f"{path.relative_to(REPO_ROOT)}:{line}: {what}"
                      for line, what in literal_tag_keys(path.read_text(), keys)]
    assert offenders == [], "use pipeline.core.contracts.Tags:\n" + "\n".join(offenders)


def test_the_experiment_opens_in_the_classic_view_unless_the_user_chose_another(mlflow_uri, tmp_path, monkeypatch):
    """The GenAI view's "Evaluation runs" page lists every run without a logged model (generate,
    split, the grid parent...); the pipeline's experiment is tagged for the classic view."""
    import mlflow

    from pipeline.core.config import TrackingConfig
    from pipeline.core.tracking import EXPERIMENT_KIND, configure_mlflow

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracking = TrackingConfig(experiment="kind-test", artifact_root=str(tmp_path / "artifacts"), system_metrics=False)
    experiment_id = configure_mlflow(tracking)  # created with the tag
    client = mlflow.MlflowClient()
    assert client.get_experiment(experiment_id).tags[Tags.EXPERIMENT_KIND] == EXPERIMENT_KIND
    other = client.create_experiment("made-elsewhere")  # an existing experiment gets it on first use
    configure_mlflow(tracking.model_copy(update={"experiment": "made-elsewhere"}))
    assert client.get_experiment(other).tags[Tags.EXPERIMENT_KIND] == EXPERIMENT_KIND
    client.set_experiment_tag(other, Tags.EXPERIMENT_KIND, "genai_development")  # the user's choice stays
    configure_mlflow(tracking.model_copy(update={"experiment": "made-elsewhere"}))
    assert client.get_experiment(other).tags[Tags.EXPERIMENT_KIND] == "genai_development"
