"""Module-selective SFT: TRL's SFTTrainer with every parameter frozen except the modules a recipe names.

    sfn train --config recipes/lab/oproj.yaml [--key value ...]
    torchrun --nproc_per_node 8 train/sft.py --config recipes/qwen2.5-math-1.5b/oproj_s1k.yaml
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml train/sft.py --config recipes/...yaml

The output folder holds a normal HF checkpoint, `sfn_plugin.safetensors` (only the trained tensors; none when every
parameter trains) and `sfn_manifest.json` (resolved recipe, trainable tensors, base fingerprint, versions, git
revision).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import EngineRequest, cast_saved_tensors, check_engine, final_save_gathered, warn_fsdp_low_precision
from .errors import SfnError, disk_full_error, is_disk_full
from .honoured import apply_recipe_aliases
from .lean_imports import KEEP_ENV
from .manifest import MANIFEST_FILE, write_json
from .outputs import (
    Selection,
    base_fingerprint,
    build_manifest,
    drop_tied_copies,
    plugin_skip_reason,
    recipe_record,
    save_full_precision,
    write_plugin_from_checkpoint,
)
from .precision import Masters, full_precision_tensors, keep_fp32_masters, restore_loaded_dtypes
from .rerun import OutputPlan, check_resume_recipe, plan_output_dir, release_replaced, take_output_dir
from .partial_checkpoints import partial_checkpoints
from .startup import check_run_setup, init_distributed, resolve_attention, setup_logging
from .stop_tokens import match_stop_tokens

logger = logging.getLogger("sfn_train")


def load_train_tokenizer(model_args, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision,
            trust_remote_code=trust_remote_code,
        )
    except OSError as exc:  # a missing local folder is looked up on the hub: say what was tried, in one line
        raise SfnError(
            f"model_name_or_path {model_args.model_name_or_path!r} is neither a local checkpoint folder nor loadable "
            f"from the hub ({type(exc).__name__}); check the path (relative paths start from the launch folder)."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype,
        attn_implementation=model_args.attn_implementation, trust_remote_code=trust_remote_code,
    )


def configure_activation_checkpointing(model, training_args) -> None:
    """Make activation checkpointing give gradients when the layer inputs are frozen.

    Reentrant checkpointing returns no gradient for a checkpointed block whose inputs do not require grad -- the case
    whenever the embeddings are frozen (transformers #21381/#23170) -- so o_proj would silently never train. We use
    non-reentrant checkpointing; a recipe that insists on reentrant gets `enable_input_require_grads()` instead.
    """
    if not training_args.gradient_checkpointing:
        return
    kwargs = dict(training_args.gradient_checkpointing_kwargs or {})
    if kwargs.get("use_reentrant"):
        model.enable_input_require_grads()
        logger.info("activation checkpointing: reentrant (as the recipe asks), with input gradients enabled.")
    else:
        kwargs["use_reentrant"] = False
    training_args.gradient_checkpointing_kwargs = kwargs
    training_args.activation_checkpointing_kwargs = kwargs


def freeze(model, sfn_args) -> Selection:
    from .roles import apply_freeze, select_parameters

    trainable = select_parameters(model, sfn_args.trainable_modules, sfn_args.trainable_layers)
    n_train, n_total = apply_freeze(model, trainable)
    logger.info("trainable: %s of %s params (%.2f%%) in %d tensors", f"{n_train:,}", f"{n_total:,}",
                100 * n_train / n_total, len(trainable))
    params = dict(model.named_parameters())
    for name in trainable:
        logger.debug("trainable tensor: %s %s", name, list(getattr(params[name], "ds_shape", None) or params[name].shape))
    return Selection(trainable_modules=sfn_args.trainable_modules, trainable_layers=sfn_args.trainable_layers,
                     trainable_tensors=trainable, trainable_params=n_train, total_params=n_total)


def log_router_aux_loss(trainer) -> None:
    """Mixture-of-experts models: say whether the router's load-balancing loss is added, and with which weight.

    TRL adds router_aux_loss_coef * aux_loss (transformers' load-balancing loss; the coefficient from the recipe's
    `router_aux_loss_coef`, else the model config's) whenever the config declares one. Its gradient reaches the
    router only if the router is selected: frozen routers do not move.
    """
    if hasattr(trainer.model.config.get_text_config(), "output_router_logits"):
        state = f"added with weight {trainer.router_aux_loss_coef}" if trainer.aux_loss_enabled else "off"
        logger.info("router auxiliary (load-balancing) loss: %s.", state)


def load_train_dataset(script_args, training_args, sfn_args, tokenizer):
    """The training rows as the trainer reads them (without the validation rows the recipe holds out)."""
    return load_datasets(script_args, training_args, sfn_args, tokenizer)[0]


def load_datasets(script_args, training_args, sfn_args, tokenizer):
    """(train dataset, validation dataset or None, row counts): the validation split is what the recipe declares,
    `validation_fraction` of the training rows, or else (with eval_strategy) the dataset's `dataset_test_split`."""
    from .data import load_rows, load_validation_rows, prepare_dataset, split_validation

    if not script_args.dataset_name:
        raise SfnError("dataset_name is not set: give a .jsonl/.json/.parquet file, a save_to_disk folder or a hub id.")
    rows = load_rows(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    validation = None
    if sfn_args.validation_fraction > 0:
        rows, validation = split_validation(rows, sfn_args.validation_fraction)
        source = f"validation_fraction {sfn_args.validation_fraction} of {script_args.dataset_name} (row-content hash)"
    elif str(training_args.eval_strategy) not in ("no", "IntervalStrategy.NO"):
        validation = load_validation_rows(script_args.dataset_name, script_args.dataset_config,
                                          script_args.dataset_test_split)
        source = f"split {script_args.dataset_test_split!r} of {script_args.dataset_name}"
    chat = sfn_args.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def prepare(data):
        return prepare_dataset(data, prompt_template=sfn_args.prompt_template,
                               completion_template=sfn_args.completion_template, chat_template=chat,
                               assistant_only_loss=training_args.assistant_only_loss,
                               dataset_format=sfn_args.dataset_format)

    dataset = prepare(rows)
    if validation is not None:
        validation = prepare(validation)
    if training_args.assistant_only_loss and not getattr(tokenizer, "chat_template", None):
        raise SfnError("assistant_only_loss needs a chat template, and this tokenizer has none: set "
                       "assistant_only_loss: false or use a model whose tokenizer defines one.")
    if training_args.assistant_only_loss:
        check_assistant_masks(tokenizer)
    # Conversations (`messages`, or prompt/completion lists of turns, which is what prepare_dataset makes of
    # single-turn `messages`) need a chat template; without this check TRL fails at tokenization with a traceback.
    conversational = "messages" in dataset.column_names or isinstance(dataset[0].get("prompt"), list)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise SfnError("the dataset has `messages` conversations but the tokenizer has no chat template: use a chat "
                       "model's tokenizer or give prompt/completion text rows.")
    dataset, validation, counts = check_lengths(dataset, validation, tokenizer, training_args, sfn_args)
    if validation is not None:
        counts["validation_source"] = source
    return dataset, validation, counts


def check_lengths(dataset, validation, tokenizer, training_args, sfn_args):
    """Both splits tokenized as TRL does and handled by the recipe's `truncation` (sfn_train/truncation.py)."""
    from .stop_tokens import template_end_of_turn
    from .truncation import apply_truncation

    stops = {i for i in (template_end_of_turn(tokenizer), tokenizer.eos_token_id) if i is not None}
    dataset, record = apply_truncation(dataset, tokenizer, training_args, sfn_args.truncation, "training", stops)
    counts = {"train_rows": len(dataset), "truncation": {"train": record}}
    if validation is not None:
        validation, counts["truncation"]["validation"] = apply_truncation(
            validation, tokenizer, training_args, sfn_args.truncation, "validation", stops)
        counts["validation_rows"] = len(validation)
    return dataset, validation, counts


def peak_gpu_memory() -> dict:
    """This process's peak GPU allocation during the run (the study's Table 2 reports it); nothing on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20}


def start_up_memory_plan(training_args, model_args, sfn_args, attention) -> dict | None:
    """The planner's prediction for this run (sfn_train/memory), on the main process, unless `memory_plan: false`."""
    if not sfn_args.memory_plan or training_args.process_index != 0:
        return None
    from .memory.plan import plan_run

    return plan_run(training_args, model_args, sfn_args, attention["used"] or "sdpa")


def check_assistant_masks(tokenizer) -> None:
    """`assistant_only_loss` needs `{% generation %}` markers around assistant turns in the chat template.

    TRL 1.16 swaps in a marked copy of the templates it knows (Qwen, Llama 3, Gemma, ...) and raises a ValueError at
    trainer construction for any other; asked here, before the model loads, so that it is one line.
    """
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        raise SfnError("assistant_only_loss needs a chat template with {% generation %} ... {% endgeneration %} "
                       "around assistant turns, and TRL cannot add them to this tokenizer's template: add the "
                       "markers to the template, or set assistant_only_loss: false.") from None


def build_trainer(model, training_args, train_dataset, tokenizer, callbacks=None, eval_dataset=None):
    """The run's trainer: TRL's SFTTrainer with FSDP2 on CPU kept and length buckets where resolve_batching chose
    them (sfn_train/trainer.py)."""
    from .trainer import SfnTrainer

    return SfnTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, callbacks=callbacks)


# --------------------------------------------------------------------------------------------------------------------
# A run: set up, train, save
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the set-up of a run checked, decided and loaded; training and saving read it."""

    args: tuple  # (script_args, training_args, model_args, sfn_args)
    engine: EngineRequest
    plan: OutputPlan  # new, resume, start over or replace (sfn_train/rerun.py)
    attention: dict
    memory_plan: dict | None
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    row_counts: dict
    model: Any
    selection: Selection
    masters: Masters
    loaded_dtypes: dict  # trained tensor name -> dtype as loaded (the saved checkpoint keeps these)
    fingerprint: dict | None
    state: Any  # accelerate's PartialState
    output_dir: Path

    @property
    def training_args(self):
        return self.args[1]

    @property
    def resume(self) -> str | None:
        return self.plan.resume

    @property
    def quantized(self) -> bool:
        return self.args[3].quantize_frozen != "none"


def run_sft(script_args, training_args, model_args, sfn_args, callbacks=None) -> Path:
    """Train the selected modules; return the output folder. `callbacks` go to the Trainer (TrainerCallback)."""
    run = setup_run(script_args, training_args, model_args, sfn_args)
    trainer, metrics, records = train_run(run, callbacks)
    save_run(run, trainer, metrics, records)
    return run.output_dir


def setup_run(script_args, training_args, model_args, sfn_args) -> Run:
    """Checks and start-up decisions before anything loads; then tokenizer and data (checked before the model, which
    may take minutes to load), model and selection; the manifest (status "running") once every rank got that far."""
    from accelerate import PartialState
    from transformers import set_seed

    from .lean_imports import blocked_packages

    setup_logging(training_args)
    if blocked_packages():
        logger.info("kept out of this process (unused by training): %s; %s=1 keeps them",
                    ", ".join(blocked_packages()), KEEP_ENV)
    if not model_args.model_name_or_path:
        raise SfnError("model_name_or_path is not set: give a local checkpoint folder or a hub id.")
    args = (script_args, training_args, model_args, sfn_args)
    apply_recipe_aliases(*args)  # TRL keys sfn does not use: mapped (load_in_4bit) or refused, sfn_train/honoured.py
    check_run_setup(training_args, model_args, sfn_args)
    engine = check_engine(training_args, sfn_args)
    plan = plan_output_dir(training_args, sfn_args)  # new, resume, start over or replace: sfn_train/rerun.py
    attention = resolve_attention(model_args, training_args)
    if plan.resume is not None:
        check_resume_recipe(plan.resume, recipe_record(args))
    init_distributed(training_args)
    set_seed(training_args.seed)
    memory_plan = start_up_memory_plan(training_args, model_args, sfn_args, attention)

    # trust_remote_code stays False unless the recipe sets it: loading a checkpoint must not run its code.
    tokenizer = load_train_tokenizer(model_args, training_args.trust_remote_code)
    train_dataset, eval_dataset, row_counts = load_datasets(script_args, training_args, sfn_args, tokenizer)
    model = load_model(model_args, training_args.trust_remote_code)
    row_counts["stop_tokens"] = match_stop_tokens(model, tokenizer)  # the template's end of turn stops generation
    selection, masters, loaded_dtypes = prepare_model(model, training_args, sfn_args)

    output_dir = Path(training_args.output_dir)
    state = PartialState()
    fingerprint = base_fingerprint(model_args) if state.is_main_process else None
    state.wait_for_everyone()
    run = Run(args, engine, plan, attention, memory_plan, tokenizer, train_dataset, eval_dataset, row_counts, model,
              selection, masters, loaded_dtypes, fingerprint, state, output_dir)
    if state.is_main_process:
        take_output_dir(plan)
        write_manifest(run, "running", engine={"requested": engine.to_dict()})
    return run


def prepare_model(model, training_args, sfn_args):
    """Freeze all but the selection, quantize the frozen linear layers if asked, keep fp32 masters of bf16/fp16
    trained tensors (sfn_train/precision.py); returns (selection, masters, the trained tensors' loaded dtypes)."""
    selection = freeze(model, sfn_args)
    if sfn_args.quantize_frozen != "none":
        # The frozen linear layers become bitsandbytes layers on the training device; the trained ones,
        # embeddings, norms and lm_head stay as loaded. Why this way into the Trainer: sfn_train/quantize.py.
        from .quantize import quantize_frozen

        selection.quantize_frozen = quantize_frozen(model, selection.trainable_tensors, sfn_args.quantize_frozen,
                                                    training_args.device)
    # FSDP leaves masters to accelerate (fp32 copies of the trained tensors under bf16/fp16 mixed precision): the
    # saved checkpoint gets them back in these, the loaded dtypes; the plugin keeps the fp32 masters.
    loaded_dtypes = {n: p.dtype for n, p in model.named_parameters() if n in set(selection.trainable_tensors)}
    masters = keep_fp32_masters(model, selection.trainable_tensors, training_args)
    if masters.engine == "fsdp":
        warn_fsdp_low_precision(loaded_dtypes, training_args)
    configure_activation_checkpointing(model, training_args)
    return selection, masters, loaded_dtypes


def train_run(run: Run, callbacks=None):
    """Train; returns (trainer, metrics, records of the precision and the engine in effect). The engine in effect is
    read from the live model at the first step, and must be the one asked for (sfn_train/callbacks.py)."""
    from .callbacks import EngineCheck, PrecisionProbe

    model, training_args = run.model, run.training_args
    precision = PrecisionProbe(model, run.selection.trainable_tensors, run.masters, training_args)
    router_logits_as_loaded = getattr(model.config.get_text_config(), "output_router_logits", None)
    trainer = build_trainer(model, training_args, run.train_dataset, run.tokenizer, [precision, *(callbacks or [])],
                            eval_dataset=run.eval_dataset)
    run.attention["padding_free"] = bool(getattr(trainer.data_collator, "padding_free", False))  # the live collator's
    trainer.sfn_partial = partial_checkpoints(run.selection, run.args[2], training_args, run.fingerprint,
                                              str(run.engine.engine))  # checkpoints hold only what changed
    engine_check = EngineCheck(trainer, run.engine)
    trainer.add_callback(engine_check)
    log_router_aux_loss(trainer)
    started = time.perf_counter()
    with training_errors(run.output_dir):
        result = trainer.train(resume_from_checkpoint=run.resume)
    metrics = {**result.metrics, "wall_s": time.perf_counter() - started, **peak_gpu_memory(), **run.row_counts}
    if run.memory_plan is not None:
        from .memory.plan import run_memory_record

        metrics["memory"] = run_memory_record(run.memory_plan)
    if run.eval_dataset is not None:  # the validation split is always scored on the final weights (sweeps rank on it)
        metrics.update(trainer.evaluate())
        logger.info("validation (%s rows, final weights): eval_loss %.4f%s", metrics.get("validation_rows", "?"),
                    metrics["eval_loss"], f", mean token accuracy {metrics['eval_mean_token_accuracy']:.4f}"
                    if "eval_mean_token_accuracy" in metrics else "")
    if getattr(trainer, "aux_loss_enabled", False):
        metrics["router_aux_loss_coef"] = trainer.router_aux_loss_coef
        # TRL turned the config's output_router_logits on for training; saved on, every forward of the fine-tune
        # (generation too) would compute the auxiliary loss. The checkpoint keeps the base's setting.
        model.config.get_text_config().output_router_logits = router_logits_as_loaded
    if run.resume is not None:
        logger.info("resumed at step %d; ran %d optimizer steps", engine_check.start_step, engine_check.steps_run)
    return trainer, metrics, {"precision": precision.record, "engine": engine_check.record()}


@contextmanager
def training_errors(output_dir: Path):
    """The training failures a user can act on, as one line: resuming where no checkpoint is complete, and a full disk
    while a checkpoint-N is saved."""
    try:
        yield
    except ValueError as exc:
        if "No valid checkpoint" in str(exc):
            raise SfnError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-* folder: "
                           "start without resuming.") from None
        raise
    except Exception as exc:
        if is_disk_full(exc, output_dir):
            raise disk_full_error(output_dir, "a half-written checkpoint-* there is skipped when you resume") from None
        raise


def save_run(run: Run, trainer, metrics: dict, records: dict) -> None:
    """Save model, plugin and manifest. Order matters: weights, then the plugin (atomic), and only then the manifest
    (atomic) with status "complete"; a run killed or out of disk before that leaves status "running"."""
    model, selection, masters, output_dir = run.model, run.selection, run.masters, run.output_dir
    try:
        final_save_gathered(trainer)
        # The plugin gets the full-precision (fp32 master) tensors; the checkpoint the loaded dtype, like the base.
        plugin_tensors = full_precision_tensors(model, selection.trainable_tensors, masters,
                                                keep=trainer.is_world_process_zero())
        restore_loaded_dtypes(model, masters)
        if not run.quantized:  # a quantized model is never saved as it is: see save_full_precision below
            trainer.save_model(str(output_dir))
        trainer.save_state()  # trainer_state.json: the loss curve (log_history), as JSON
        run.state.wait_for_everyone()
        if trainer.is_world_process_zero():
            # The Trainer pickles its arguments next to the weights; the manifest records them as JSON instead.
            (output_dir / "training_args.bin").unlink(missing_ok=True)
            if run.quantized:
                # The trained tensors in full precision as the plugin, and the output checkpoint rebuilt
                # from the unquantized base's own files with them in place (loads without bitsandbytes).
                save_full_precision(model, selection, output_dir, run.args[2].model_name_or_path, run.fingerprint,
                                    run.tokenizer, tensors=plugin_tensors)
                model.generation_config.save_pretrained(output_dir)  # the run's (stop tokens), not the base's
            else:
                drop_tied_copies(output_dir, model)  # a gathered state dict holds both names of a tied weight
                write_plugin_from_checkpoint(output_dir, selection, run.fingerprint, tensors=plugin_tensors,
                                             model=model)
                if masters.engine == "fsdp":
                    cast_saved_tensors(output_dir, run.loaded_dtypes, model=model)
            write_manifest(run, "complete", metrics, precision=records["precision"], engine=records["engine"])
            release_replaced(run.plan)
            logger.info("saved %s and manifest to %s", "checkpoint" if plugin_skip_reason(selection) else
                        "checkpoint, plugin", output_dir)
    except Exception as exc:  # a full disk during the final save is one line; the manifest keeps status "running"
        if is_disk_full(exc, output_dir):
            raise disk_full_error(output_dir, f"{MANIFEST_FILE} there keeps status running (not complete)") from None
        raise
    run.state.wait_for_everyone()


def write_manifest(run: Run, status: str, metrics: dict | None = None, **record) -> None:
    write_json(run.output_dir / MANIFEST_FILE, build_manifest(run.args, run.selection, run.attention, run.fingerprint,
                                                              status, metrics, **record))


def cli_main(argv: list[str]) -> int:
    from .lean_imports import keep_unused_packages_out

    keep_unused_packages_out()  # first, before anything imports transformers (see sfn_train/lean_imports.py)
    from .config import USAGE, parse_recipe, print_help

    if not argv:  # as git and pip: the usage and where help is, on stderr, and a failure status
        print(f"usage: {USAGE}\n(sfn train --help: the main keys; --help-all: every key)", file=sys.stderr)
        return 2
    if {"-h", "--help", "--help-all"} & set(argv):
        print_help(full="--help-all" in argv)
        return 0
    run_sft(*parse_recipe(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
