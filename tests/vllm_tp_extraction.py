"""Run by tests/test_vllm_activations.py in a process of its own: `vllm_mean_activations` in an engine
with tensor parallel N (worker processes of their own), on sequences and spans read from a JSON file;
the means go to a safetensors file.

    python tests/vllm_tp_extraction.py MODEL_DIR N INPUT.json OUTPUT.safetensors LAYER [LAYER ...]
"""

import json
import sys

if __name__ == "__main__":  # vLLM's workers start by spawn and import this file again
    from safetensors.torch import save_file

    from assistant_axis.engines.vllm import vllm_mean_activations
    from assistant_axis.engines.vllm.engine import recording_engine, vllm_engine_args

    model, tp, source, output, *layers = sys.argv[1:]
    data = json.loads(open(source).read())
    # Eager: three workers compiling on two cores take ~3 minutes (the compiled recording is tested at
    # tensor parallel 1, tests/test_vllm_serve.py; the ops are the same either way).
    engine = {"tensor_parallel_size": int(tp), "kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 2048}
    engine["enforce_eager"] = True
    llm = recording_engine(vllm_engine_args(model, {**engine, "enable_prefix_caching": False}, "test", "float32"))
    means = vllm_mean_activations(llm, data["sequences"], data["spans"], [int(x) for x in layers], progress=False)
    save_file({"means": means}, output)
    llm.llm_engine.engine_core.shutdown()
