"""A vLLM worker extension that installs new weights from safetensors files.

vLLM mixes this class into its workers when started with
`worker_extension_cls="medvistagym.policy.vllm_worker.WeightSyncExtension"` (engine argument)
or `--worker-extension-cls medvistagym.policy.vllm_worker.WeightSyncExtension` (server), so
`collective_rpc("medvista_load_weights", args=(path,))` runs it on every worker. vLLM is
imported only inside the method, which runs in vLLM's workers: the module stays importable
where vLLM is not installed.
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    """Mixed into vLLM's `Worker`: `self` is the worker."""

    def medvista_load_weights(self: Any, path: str) -> int:
        """Load a safetensors file (or a directory of them), tensors named as in the Hugging
        Face checkpoint, into the running model; returns how many tensors were read.

        Goes through the worker's `reload_weights`, not `model.load_weights` alone: vLLM
        repacks some weights after loading and frees the originals (all linear layers on CPU,
        quantised ones on GPU), so a bare `load_weights` would write into emptied parameters;
        `reload_weights` restores the checkpoint layout layer by layer, loads and repacks.
        A layer must come whole (all of its checkpoint tensors) in one call.
        """
        from .base import iter_weights

        count = 0

        def counted():  # streams the files one at a time, counting
            nonlocal count
            for item in iter_weights(path):
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        _repack_tied_lm_heads(self.model_runner.get_model())
        return count


def _repack_tied_lm_heads(model: Any) -> None:
    """An LM head tied to the input embedding loads no tensor of its own, so the reload
    restores it as it was, with (on CPU) the packed GEMM copy of the old embedding that
    vLLM made for it; repack it from the shared, now updated, weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {
        id(m.weight) for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    }
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and id(module.weight) in embeddings:
            module.quant_method.process_weights_after_loading(module)
