"""The registered model's code, logged "from code" by pipeline.core.servable.log_adapter_model.

MLflow copies this file into the model and executes it on load; `set_model` names the model.
Nothing else imports it (it imports mlflow at module level, which train must not).
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc

from pipeline.core.servable import ADAPTER_ARTIFACT, BASE_ARTIFACT, AdapterServer


class ConversationalAdapterModel(mlflow.pyfunc.PythonModel):
    """LoRA adapter + referenced base model, answering questions in the fine-tuned tone."""

    def load_context(self, context) -> None:
        """Resolve and verify the base, load it in the evaluated precision, apply the adapter."""
        self.server = AdapterServer(dict(context.model_config or {}), context.artifacts[ADAPTER_ARTIFACT],
                                    context.artifacts[BASE_ARTIFACT])

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """One answer per question, decoded exactly as the evaluation did, whatever else is in
        the request (params may override max_new_tokens; batch_size is ignored)."""
        return self.server.answer(model_input, params)


mlflow.models.set_model(ConversationalAdapterModel())
