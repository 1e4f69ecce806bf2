"""MLflow pyfunc model (models-from-code): a serving bundle answering the HTTP endpoint's JSON.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    model.predict([{"context": ["I passed my driving test!"], "situation": None}])
    -> [{"response": "...", "emotion": "proud", "emotion_top": [{"label", "prob"}, ...], "evidence": [...],
         "screened": false, "screen": null}]

    mlflow models predict -m runs:/<run_id>/model -t json --env-manager local \
        -i <(echo '{"inputs": [{"context": ["I passed my driving test!"]}]}')

Logged by `cluster.tracking.runs.log_pyfunc_model` with the bundle (trainers.artifacts: safetensors + JSON,
never unpickled) as the artifact `bundle`, `SIGNATURE` and `INPUT_EXAMPLE`, and `trainers/` + `services/`
as code paths. The signature is derived from the HTTP schema (services.schemas.RespondRequest /
RespondResponse, less the registry's `model` field) and each request is validated by RespondRequest, as the
endpoint validates its body. The crisis screen (services/safety.py) applies as on the endpoint: a screened request
gets the fixed message and never reaches the model; it is on with the default lexicon unless the model's
`model_config` says otherwise (`mlflow.pyfunc.load_model(uri, model_config={"crisis_screen": {...}})`, the
Serve config's `args.crisis_screen` schema). Imports stay minimal (mlflow, pydantic): the heavy ones happen in
load_context.
"""

from __future__ import annotations

import types
import typing

import mlflow
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Object, Property, Schema
from pydantic import BaseModel, ValidationError

from services.safety import CrisisScreen, CrisisScreenConfig, respond_screened
from services.schemas import RespondRequest, RespondResponse, field_errors

SCALARS = {str: DataType.string, float: DataType.double, int: DataType.long, bool: DataType.boolean}


def _optional(annotation) -> tuple[object, bool]:
    """(the annotation less None, whether None is allowed): `str | None` -> (str, True)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _mlflow_type(annotation):
    """A pydantic field annotation (after `_optional`) -> its MLflow type."""
    base = typing.get_origin(annotation) or annotation
    if base is typing.Annotated:                                      # a validated type, e.g. schemas.Text
        return _mlflow_type(typing.get_args(annotation)[0])
    if base is list:
        return Array(_mlflow_type(typing.get_args(annotation)[0]))
    if isinstance(base, type) and issubclass(base, BaseModel):
        return Object([Property(k, _mlflow_type(_optional(f.annotation)[0])) for k, f in base.model_fields.items()])
    return SCALARS.get(base, AnyType())                               # dict[str, Any], Any: any JSON


def _schema(model: type[BaseModel], leave_out: tuple[str, ...] = ()) -> Schema:
    """One column per field of a pydantic model, required unless it may be None."""
    cols = []
    for name, f in model.model_fields.items():
        if name not in leave_out:
            annotation, optional = _optional(f.annotation)
            cols.append(ColSpec(_mlflow_type(annotation), name, required=not optional))
    return Schema(cols)


# The HTTP schema's, less the registry's `model` field (the pyfunc model is one version, no registry).
SIGNATURE = ModelSignature(inputs=_schema(RespondRequest), outputs=_schema(RespondResponse, leave_out=("model",)))
INPUT_EXAMPLE = RespondRequest.model_config["json_schema_extra"]["examples"]


def _requests(model_input) -> list[RespondRequest]:
    """A list of request dicts, one dict, or a DataFrame with columns context / situation, each validated as the
    HTTP endpoint validates its body (services.schemas.RespondRequest, default limits); other keys are ignored."""
    if hasattr(model_input, "to_dict"):  # pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    out = []
    for i, r in enumerate(model_input):
        context = r.get("context") if isinstance(r, dict) else None
        if hasattr(context, "tolist"):
            context = context.tolist()
        if isinstance(context, tuple):
            context = list(context)
        situation = r.get("situation") if isinstance(r, dict) else None
        if situation is not None and not isinstance(situation, str):
            situation = None if situation != situation else str(situation)  # NaN from a DataFrame -> None
        try:
            out.append(RespondRequest.model_validate({"context": context, "situation": situation or None}))
        except ValidationError as e:
            raise ValueError(f"request {i}: " + "; ".join(f"{f.field}: {f.message}" for f in field_errors(e))) \
                from e
    return out


def screen_from(model_config: dict | None) -> CrisisScreen:
    """The crisis screen a pyfunc model's `model_config["crisis_screen"]` configures (default: on, default
    lexicon); ValueError naming the field when it is invalid."""
    try:
        return CrisisScreen(CrisisScreenConfig.model_validate((model_config or {}).get("crisis_screen") or {}))
    except ValidationError as e:
        raise ValueError(f"invalid model_config crisis_screen: {e}") from e


class ResponderModel(PythonModel):
    """Wraps `trainers.inference.Responder`; loads the bundle once and warms it up."""

    def load_context(self, context) -> None:
        from trainers.inference import Responder

        self.screen = screen_from(getattr(context, "model_config", None))
        self.responder = Responder.from_bundle(context.artifacts["bundle"], device="cpu")
        self.responder.warm_up()

    def predict(self, context, model_input, params=None) -> list[dict]:
        from trainers.inference import Request

        requests = [Request(r.context, r.situation) for r in _requests(model_input)]
        return [a.body() for a in respond_screened(self.screen, self.responder.respond, requests)]


mlflow.models.set_model(ResponderModel())
