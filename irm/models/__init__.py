"""Models: specs and loading (:mod:`.loading`), how a loaded model computes (:mod:`.compute`: oneDNN
linears, mixed precision, unwrapped HF modules, log-probabilities), the base/tuned pair (:mod:`.pair`)
and sampling (:mod:`.generation`).

A model is named by a *spec* string: ``"smollm2-135m-instruct"`` (the embedded default), a ``.gguf``
file, a ``save_pretrained`` directory, ``"tiny-llama[:seed=1,...]"`` or a Hugging Face hub name.

>>> base = load_model("smollm2-135m-instruct")
>>> pair = ModelPair(base, load_model("runs/default/tuned"))
"""

from irm.models.compute import (
    OneDNNLinear,
    bridge_original,
    compute_dtype,
    dtype_name,
    float32_compute,
    onednn_linear_available,
    set_compute_dtype,
    shared_pass_check,
    token_logprobs,
    torch_dtype,
    unwrapped,
    use_onednn_linear,
)
from irm.models.loading import (
    LoadedModel,
    ModelIdentity,
    TinyRecipe,
    build_tiny_llama,
    build_tiny_tokenizer,
    cache_dir,
    load_model,
    load_tokenizer,
    make_bridge,
    model_identity,
    resolve_checkpoint,
    resolve_device,
)
from irm.models.pair import ModelPair, ModelPairMismatch

__all__ = [
    "LoadedModel", "ModelIdentity", "ModelPair", "ModelPairMismatch", "TinyRecipe", "OneDNNLinear",
    "build_tiny_llama", "build_tiny_tokenizer", "cache_dir", "load_model", "load_tokenizer", "make_bridge",
    "model_identity", "resolve_checkpoint", "resolve_device", "bridge_original", "compute_dtype", "dtype_name",
    "float32_compute", "onednn_linear_available", "set_compute_dtype", "shared_pass_check", "token_logprobs",
    "torch_dtype", "unwrapped", "use_onednn_linear",
]
