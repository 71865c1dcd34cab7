"""Checks of what a run needs outside itself -- logging integrations, the Hugging Face Hub -- made at start-up.

Without them the HF Trainer finds out at construction or at the first push, after the model has loaded and the output
folder has been written: a missing `tensorboard` is a 28-line traceback, `push_to_hub` offline a double one. Each
check here is one line naming the key and the fix, before anything is loaded or written.
"""

from __future__ import annotations

import os

from .errors import SfnError

# report_to name -> the package to install (where it is not the name itself)
PACKAGES = {"tensorboard": "tensorboard", "azure_ml": "azureml-core", "comet_ml": "comet_ml", "neptune": "neptune",
            "clearml": "clearml", "dagshub": "dagshub", "flyte": "flytekit", "dvclive": "dvclive",
            "codecarbon": "codecarbon", "mlflow": "mlflow", "wandb": "wandb", "swanlab": "swanlab",
            "trackio": "trackio", "kubeflow": "kubeflow"}


def report_to_names(training_args) -> list[str]:
    value = training_args.report_to
    names = [value] if isinstance(value, str) else list(value or [])
    return [n for n in names if n not in ("none", "all")]


def check_report_to(training_args) -> None:
    """Every integration `report_to` names must be importable here (transformers' own availability test)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    for name in report_to_names(training_args):
        if name not in INTEGRATION_TO_CALLBACK:
            raise SfnError(f"report_to {name!r} is not an integration transformers knows: use one of "
                           f"{', '.join(INTEGRATION_TO_CALLBACK)} or none.")
        if name not in available:
            package = PACKAGES.get(name, name)
            raise SfnError(f"report_to {name} needs the {package} package, which is not installed here: "
                           f"pip install {package}, or set `report_to: none`.")


def check_hub(training_args) -> None:
    """`push_to_hub` needs the hub and a token that it accepts: asked once, now."""
    if not training_args.push_to_hub:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise SfnError("push_to_hub is set but HF_HUB_OFFLINE=1 keeps this process off the hub: unset "
                       "HF_HUB_OFFLINE, or set `push_to_hub: false` and upload the output folder later.")
    from huggingface_hub import whoami

    try:
        whoami(token=training_args.hub_token)
    except Exception as exc:  # noqa: BLE001 - unreachable, refused or no token: all mean the push would fail
        raise SfnError(f"push_to_hub is set but the hub did not accept this process ({type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else 'no detail'}): log in with "
                       "`hf auth login` (or pass hub_token), check the network, or set `push_to_hub: false`.") from None


def check_outside_needs(training_args) -> None:
    check_report_to(training_args)
    check_hub(training_args)
