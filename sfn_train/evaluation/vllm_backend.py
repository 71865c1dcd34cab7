"""The vLLM backend: checks vLLM would make after minutes of start-up, one engine per model, explicit shutdown.

vLLM loads weights from a folder, so for a base + plugin the merged checkpoint is written once per model by the
streaming `plugin_apply` (tensor by tensor, in the base's stored dtype) into a temporary folder (`$TMPDIR`; it needs
the model's size on disk), one engine is built for all of that model's tasks, shut down explicitly, and the folder
removed. Before anything loads, `check_vllm` refuses in one line a tensor-parallel size that does not divide the
attention heads or exceeds the visible GPUs, and a `max_model_len` beyond the model's context length.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import SfnError
from .context import check_max_model_len, read_config, text_config
from .forcing import Row, make_forcing, timed_rounds
from .settings import GenerationSettings, ModelSpec


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise SfnError("--backend vllm needs vLLM installed (pip install 'sfn-train[vllm]' on a GPU machine); "
                       "or use --backend hf.") from None
    return vllm


def check_vllm(specs: list[ModelSpec], settings: GenerationSettings) -> None:
    """Everything vLLM would refuse after minutes of start-up, refused now in one line."""
    import_vllm()
    tp, gpus = settings.tensor_parallel_size, visible_gpus()
    if gpus == 0:
        raise SfnError("--backend vllm needs a CUDA GPU and none is visible; use --backend hf on this machine.")
    if tp > gpus:
        raise SfnError(f"--tensor-parallel-size {tp} needs {tp} GPUs but {gpus} are visible "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use at most {gpus}.")
    for spec in specs:
        cfg = text_config(read_config(spec.path))
        heads = cfg.get("num_attention_heads")
        if isinstance(heads, int):
            fits = [d for d in range(1, gpus + 1) if heads % d == 0]
            if heads % tp:
                raise SfnError(f"--tensor-parallel-size {tp} does not divide the {heads} attention heads of "
                               f"{spec.path}; use one of {', '.join(map(str, fits))}.")
            kv = cfg.get("num_key_value_heads") or heads
            if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
                raise SfnError(f"--tensor-parallel-size {tp} cannot split the {kv} key/value heads of {spec.path} "
                               f"(it must divide them, or be a multiple of them); use one of "
                               f"{', '.join(str(d) for d in fits if (kv % d == 0 if kv >= d else d % kv == 0))}.")
        check_max_model_len(spec, settings)



_VLLM_DTYPES = {"auto": "bfloat16", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                "float16": "float16", "fp32": "float32", "float32": "float32"}


@contextlib.contextmanager
def merged_checkpoint(spec: ModelSpec):
    """A folder vLLM can load: the model's own, or base + plugin written once by the streaming `plugin_apply`.

    The merged folder is in the base's stored dtype (plugin tensors are cast to it, the rest copied byte for byte) and
    is removed when the block ends. `plugin_apply` checks the plugin against the base by the same rule as the hf
    backend (fingerprint included unless `force_plugin`); `evaluate` already ran that check before anything loaded.
    """
    from ..checkpoint import resolve_path

    if not spec.plugin:
        yield str(resolve_path(spec.path))
        return
    from ..plugin import plugin_apply

    tmp = Path(tempfile.mkdtemp(prefix="sfn-eval-merged-"))
    try:
        plugin_apply(spec.path, spec.plugin, tmp / "model", force=spec.force_plugin,
                     command=f"sfn eval --backend vllm (merged {spec.label} for the engine)")
        yield str(tmp / "model")
    finally:
        try:
            shutil.rmtree(tmp)
        except OSError as exc:
            print(f"warning: could not remove the merged checkpoint {tmp} ({exc}); delete it by hand.", file=sys.stderr)


class VllmEngine:
    """One vLLM engine for one model, used for all of its tasks: built once, shut down explicitly by `close`.

    Why one engine per model and an explicit shutdown: building an engine costs minutes, and a second engine in one
    process while the first still holds its GPU memory runs out of memory.
    """

    def __init__(self, spec: ModelSpec, settings: GenerationSettings):
        self.vllm = import_vllm()
        self.settings = settings
        self.expected_context = check_max_model_len(spec, settings)
        self._stack = contextlib.ExitStack()
        try:
            path = self._stack.enter_context(merged_checkpoint(spec))
            kwargs = dict(model=path, tokenizer=path, tensor_parallel_size=settings.tensor_parallel_size,
                          seed=settings.seed, dtype=_VLLM_DTYPES.get(settings.dtype, settings.dtype),
                          generation_config="vllm", gpu_memory_utilization=settings.gpu_memory_utilization)
            if settings.max_model_len is not None:
                kwargs["max_model_len"] = settings.max_model_len
            self.llm = self.vllm.LLM(**kwargs)
        except BaseException:
            self._stack.close()
            raise
        self.info = self._read_info()

    def _read_info(self) -> dict:
        """Engine facts read from the live engine: context length and dtype in effect."""
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        length = getattr(config, "max_model_len", None)
        if length is None:
            print(f"note: could not read max_model_len from the vLLM engine; using {self.expected_context} "
                  "(derived from config.json).", file=sys.stderr)
            length = self.expected_context
        return {"engine": "vllm", "context_length": length, "dtype": str(getattr(config, "dtype", None))}

    def generate(self, tokenizer, rows: list[Row], eos_ids: list[int], progress: bool = True) -> float:
        """Fill every row's gen_ids; returns the generation wall time in seconds."""
        settings, vllm = self.settings, self.vllm
        forcing = make_forcing(tokenizer, settings, eos_ids, self.info["context_length"], rows)

        def submit(live: list[tuple[Row, int]]) -> list[tuple[list[int], int | None]]:
            params = [
                vllm.SamplingParams(
                    n=1, temperature=settings.temperature, top_p=settings.top_p if settings.temperature else 1.0,
                    top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    max_tokens=asked, min_tokens=min(forcing.min_tokens(r), asked),
                    seed=settings.seed * 1_000_003 + r.problem_index * 1009 + r.sample_index + 7919 * r.rounds,
                    stop_token_ids=forcing.stop_ids(r), ignore_eos=False, skip_special_tokens=True,
                )
                for r, asked in live
            ]
            prompts = [{"prompt_token_ids": r.prompt_ids + r.gen_ids} for r, _ in live]
            out = []
            for result in self.llm.generate(prompts, params, use_tqdm=False):
                done = result.outputs[0]
                stop = None
                if done.finish_reason == "stop":  # stop_reason: the stop token id; None for the model's EOS
                    stop = done.stop_reason if isinstance(done.stop_reason, int) else eos_ids[0]
                out.append((list(done.token_ids), stop))
            return out

        return timed_rounds(rows, forcing, submit, progress)

    def close(self) -> None:
        """Shut the engine down, free its GPU memory and distributed state, remove the merged folder."""
        llm, self.llm = getattr(self, "llm", None), None
        try:
            if llm is not None:
                _shutdown_vllm(llm)
                del llm
                gc.collect()
        finally:
            self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



def _shutdown_vllm(llm) -> str:
    """Stop a vLLM engine now rather than at garbage collection; returns how.

    vLLM versions differ: newer ones have `LLM.shutdown()`; current V1 ones stop the engine core (its process or
    in-process executor) with `llm.llm_engine.engine_core.shutdown()`. Then the distributed groups are destroyed and
    the CUDA cache emptied (`vllm.distributed.parallel_state.cleanup_dist_env_and_memory`), as vLLM's own tests do
    between engines.
    """
    if callable(getattr(llm, "shutdown", None)):
        llm.shutdown()
        how = "LLM.shutdown()"
    else:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown()
            how = "llm_engine.engine_core.shutdown()"
        else:
            how = "garbage collection"
            print("note: this vLLM offers no engine shutdown; relying on garbage collection to free the GPU.",
                  file=sys.stderr)
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:
        cleanup_dist_env_and_memory = None
    if cleanup_dist_env_and_memory is not None:
        cleanup_dist_env_and_memory()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return how
