"""MLflow pyfunc model (models-from-code): a serving bundle answering the HTTP endpoint's JSON.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    model.predict([{"context": ["I passed my driving test!"], "situation": None}])
    -> [{"response": "...", "emotion": "proud", "emotion_top": [{"label", "prob"}, ...], "evidence": [...]}]

    mlflow models predict -m runs:/<run_id>/model -t json --env-manager local \
        -i <(echo '{"inputs": [{"context": ["I passed my driving test!"]}]}')

Logged by `cluster.tracking.runs.log_pyfunc_model` with the bundle (trainers.artifacts: safetensors + JSON,
never unpickled) as the artifact `bundle`, `SIGNATURE` and `INPUT_EXAMPLE`, and `trainers/` + `services/`
as code paths. The signature is the HTTP schema's (services.schemas.RespondRequest / RespondResponse, less
the registry's `model` field). Imports stay minimal: the heavy ones happen in load_context.
"""

from __future__ import annotations

import mlflow
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Object, Property, Schema

RESPONSE_KEYS = ("response", "emotion", "emotion_top", "evidence")
INPUT_EXAMPLE = [{"context": ["I finally passed my driving test today!"], "situation": None}]
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(Array(DataType.string), "context"),
                   ColSpec(DataType.string, "situation", required=False)]),
    outputs=Schema([ColSpec(DataType.string, "response"), ColSpec(DataType.string, "emotion", required=False),
                    ColSpec(Array(Object([Property("label", DataType.string), Property("prob", DataType.double)])),
                        "emotion_top"),
                    ColSpec(Array(AnyType()), "evidence")]),
)


def _requests(model_input) -> list[dict]:
    """A list of request dicts, one dict, or a DataFrame with columns context / situation."""
    if hasattr(model_input, "to_dict"):  # pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    out = []
    for i, r in enumerate(model_input):
        context = r.get("context") if isinstance(r, dict) else None
        if hasattr(context, "tolist"):
            context = context.tolist()
        ok = isinstance(context, list | tuple) and context and all(isinstance(t, str) for t in context)
        if not ok:
            raise ValueError(f"request {i}: 'context' must be a non-empty list of strings")
        situation = r.get("situation")
        if situation is not None and not isinstance(situation, str):
            situation = None if situation != situation else str(situation)  # NaN from a DataFrame -> None
        out.append({"context": list(context), "situation": situation or None})
    return out


class ResponderModel(PythonModel):
    """Wraps `trainers.inference.Responder`; loads the bundle once and warms it up."""

    def load_context(self, context) -> None:
        from trainers.inference import Responder

        self.responder = Responder.from_bundle(context.artifacts["bundle"], device="cpu")
        self.responder.warm_up()

    def predict(self, context, model_input, params=None) -> list[dict]:
        answers = self.responder.respond(_requests(model_input))
        return [{k: a[k] for k in RESPONSE_KEYS} for a in answers]


mlflow.models.set_model(ResponderModel())
