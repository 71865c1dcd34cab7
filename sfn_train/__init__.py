"""sfn-train: module-selective fine-tuning of LLMs (o_proj by default) and the SfN stethoscopes."""

__version__ = "0.1.0"
