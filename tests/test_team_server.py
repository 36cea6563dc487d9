"""The registry against the team's tracking server: `mlflow server` on a real PostgreSQL store.

The registry tests of tests/test_registry.py are imported here unchanged, so they run a second
time with this module's `server` fixture: the session's PostgreSQL-backed server
(tests/team_fixtures.py) instead of test_registry's sqlite one. That covers promotion with
aliases, the model card and lineage tags and loading the logged model back through the server's
proxied artifacts (`mlflow-artifacts:/`), rollback, lineage, and the promotion race from two
processes (with and without the file lock: PostgreSQL reports a lost INSERT race as a
UniqueViolation, which the registry must retry just like sqlite's IntegrityError).
"""

from __future__ import annotations

import pytest

from tests.test_registry import (  # noqa: F401  (fixtures and tests collected here again)
    registry_name,
    test_better_candidate_replaces_production_rollback_and_explicit_restore,
    test_lineage_of_a_model_uri_audits_every_dataset_against_dvc_lock,
    test_promote_registers_the_best_adapter_with_lineage_tags_card_aliases_and_it_answers,
    test_two_promotions_racing_from_two_processes_end_consistent,
    workspace,
    ws,
)


@pytest.fixture(scope="module")
def server(team_server_info):
    """test_registry's `server`, served by PostgreSQL (same keys; `ready` waits for /health)."""
    return {"uri": team_server_info["uri"], "artifacts": team_server_info["artifacts"],
            "ready": team_server_info["ready"]}


def test_the_store_behind_the_server_is_postgresql(ws, team_server_info):  # noqa: F811 (a fixture)
    """The runs the imported tests use really are rows in PostgreSQL, not a sqlite file."""
    import psycopg2

    store = team_server_info["store_uri"].replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(store) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name FROM runs WHERE run_uuid = %s", (ws["runs"]["A"]["run_id"],))
        assert cursor.fetchone() == (ws["runs"]["A"]["name"],)
        cursor.execute("SELECT version()")
        assert cursor.fetchone()[0].startswith("PostgreSQL")
