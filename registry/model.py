"""The registered model, as the registry sees it: re-exported from the core.

The pyfunc model (adapter + referenced base) and how it is logged live in
pipeline.core.servable (with the model code in pipeline/core/servable_model.py); loading a base,
attaching an adapter and answering live in pipeline.core.modeling, the one inference path that
the train and predict stages use too. Importing this module does not import mlflow.
"""

from __future__ import annotations

from pipeline.core.modeling import (
    BASE_MODEL_DIR_ENV,
    DecodingPolicy,
    adapter_dtype,
    answer_questions,
    base_model_reference,
    cast_adapter_weights,
    load_adapter_model,
    resolve_base_model,
    weights_sha256,
)
from pipeline.core.servable import (
    ADAPTER_ARTIFACT,
    BASE_ARTIFACT,
    BASE_REFERENCE_FILE,
    MODEL_CONFIG_KEYS,
    AdapterServer,
    log_adapter_model,
    model_config,
)

__all__ = [
    "ADAPTER_ARTIFACT", "BASE_ARTIFACT", "BASE_MODEL_DIR_ENV", "BASE_REFERENCE_FILE", "MODEL_CONFIG_KEYS",
    "AdapterServer", "DecodingPolicy", "adapter_dtype", "answer_questions", "base_model_reference",
    "cast_adapter_weights", "load_adapter_model", "log_adapter_model", "model_config", "resolve_base_model",
    "weights_sha256",
]
