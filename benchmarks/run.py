"""Benchmarks: each figure is a ratio against a baseline measured in the same process on the same inputs.

    python benchmarks/run.py            # all five; prints a table (about 10 minutes on 2 CPU cores)
    python benchmarks/run.py extraction # one of: extraction generation judge floor planning

Not part of the test suite. Results and the machine line go into benchmarks/README.md by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from assistant_axis.activations import mean_activations
from assistant_axis.backends import Sampling, TransformersBackend
from assistant_axis.models import find_blocks, load_model, prepare_model
from assistant_axis.roles import load_bank, load_questions
from assistant_axis.templates import build_messages, render_ids, response_span

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks/.cache"
ROWS: list[tuple[str, str, str]] = []


def report(name: str, value: str, note: str = "") -> None:
    ROWS.append((name, value, note))
    print(f"{name:<44} {value:>16}  {note}", flush=True)


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def model_dir() -> str:
    return prepare_model("smollm2-135m-instruct", "bundled:smollm2-135m-instruct", CACHE / "models").path


def conversations(n: int) -> list[list[dict]]:
    bank = load_bank(ROOT / "data/roles")
    questions = load_questions(ROOT / "data/questions/questions.jsonl")
    roles = sorted(r for r in bank if r != "default")
    return [build_messages(bank[roles[i % len(roles)]].prompts[0], questions[i % len(questions)].question)
            for i in range(n)]


def responses_256(model, tokenizer) -> list[tuple[list[dict], str]]:
    """256 replies of the bundled model (generated once, cached)."""
    path = CACHE / "responses.json"
    if path.is_file():
        return [(c, r) for c, r in json.loads(path.read_text())]
    convs = conversations(256)
    replies = TransformersBackend(model, tokenizer, 32, progress=False).generate(convs, Sampling(0.7, 0.9, 96, 1))
    data = [(c, g.text) for c, g in zip(convs, replies, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


# ------------------------------------------------------------------------------------------ floor


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(10)], repeat=3)
    return 10 * 2 * n**3 / seconds


def flops_per_token(model, mean_len: float) -> float:
    """2 x non-embedding parameters, plus attention scores and values (causal: about half of T)."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * mean_len / 2
    return 2 * params + attention


# ------------------------------------------------------------------------------------- extraction


def naive_extraction(model, seqs, spans) -> torch.Tensor:
    """One conversation at a time, every hidden state, the full model with its LM head; means afterwards."""
    out = []
    with torch.inference_mode():
        for ids, (start, end) in zip(seqs, spans, strict=True):
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1:]
            out.append(torch.stack([h[0, start:end].mean(0) for h in hidden]))
    return torch.stack(out)


def bench_extraction(path: str, fp32_floor: float | None, bf16_floor: float | None) -> None:
    model, tokenizer = load_model(path, "float32", device="cpu")
    data = responses_256(model, tokenizer)
    seqs, spans = [], []
    for conv, reply in data:
        ids, start, end = response_span(tokenizer, conv, reply)
        seqs.append(ids)
        spans.append((start, end))
    tokens = sum(map(len, seqs))
    n_layers = len(find_blocks(model))
    layers = list(range(n_layers))
    # Agreement first: the last block's raw output is compared through our hooks on both sides.
    ours = mean_activations(model, seqs, spans, layers, batch_tokens=4096, progress=False)
    ref = naive_extraction(model, seqs[:32], spans[:32])
    rel = ((ours[:32, :-1] - ref[:, :-1]).norm() / ref[:, :-1].norm()).item()  # hidden_states[-1] is post-norm
    report("extraction agreement (rel. L2, fp32)", f"{rel:.2e}", "must be <= 1e-5")
    t_naive, _ = timed(lambda: naive_extraction(model, seqs, spans))
    t_ours, _ = timed(lambda: mean_activations(model, seqs, spans, layers, batch_tokens=4096, progress=False), 2)
    report("extraction naive, fp32", f"{tokens / t_naive:.0f} tok/s", f"{len(seqs)} responses, {tokens} tokens")
    report("extraction ours, fp32", f"{tokens / t_ours:.0f} tok/s", f"{t_naive / t_ours:.2f}x naive (target 3x)")
    mean_len = tokens / len(seqs)
    if fp32_floor:
        floor = fp32_floor / flops_per_token(model, mean_len)
        report("extraction ours / fp32 FLOP floor", f"{tokens / t_ours / floor:.0%}", f"floor {floor:.0f} tok/s")
    bf16, _ = load_model(path, "bfloat16", device="cpu")
    t_bf16, _ = timed(lambda: mean_activations(bf16, seqs, spans, layers, batch_tokens=4096, progress=False), 2)
    report("extraction ours, bf16", f"{tokens / t_bf16:.0f} tok/s", f"{t_naive / t_bf16:.2f}x naive fp32")
    if bf16_floor:
        floor = bf16_floor / flops_per_token(model, mean_len)
        report("extraction ours / bf16 FLOP floor", f"{tokens / t_bf16 / floor:.0%}", f"floor {floor:.0f} tok/s")


# ------------------------------------------------------------------------------------- generation


def bench_generation(path: str) -> None:
    model, tokenizer = load_model(path, "float32", device="cpu")
    convs = conversations(64)
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=64)
    eos = tokenizer.eos_token_id

    def per_prompt():
        n = 0
        with torch.inference_mode():
            for conv in convs:
                ids = torch.tensor([render_ids(tokenizer, conv, add_generation_prompt=True)])
                out = model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=eos)
                n += out.shape[1] - ids.shape[1]
        return n

    t_base, n_base = timed(per_prompt)
    backend = TransformersBackend(model, tokenizer, batch_size=32, progress=False)
    t_ours, replies = timed(lambda: backend.generate(convs, greedy))
    n_ours = sum(r.n_tokens for r in replies)
    report("generation per-prompt baseline", f"{n_base / t_base:.0f} tok/s", "64 prompts, 64 tokens, greedy")
    report("generation ours (batched)", f"{n_ours / t_ours:.0f} tok/s",
           f"{(n_ours / t_ours) / (n_base / t_base):.2f}x baseline (target 5x)")


# ------------------------------------------------------------------------------------------ judge


class _DelayServer:
    """A loopback OpenAI-compatible endpoint that answers every request after a fixed delay."""

    def __init__(self, delay: float):
        body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "3"},
                                        "logprobs": {"content": [{"token": "3", "logprob": -0.1, "top_logprobs": [
                                            {"token": d, "logprob": -1.0 - int(d)} for d in "0123"]}]}}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        ThreadingHTTPServer.request_queue_size = 256
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def bench_judge() -> None:
    from assistant_axis.judge import OpenAIJudge

    server = _DelayServer(delay=0.05)
    prompts = [f"Rate reply number {i}." for i in range(1000)]

    def run(concurrency: int, n: int) -> float:
        judge = OpenAIJudge({"base_url": server.url, "model": "m", "api_key_env": None, "cache": None,
                             "concurrency": concurrency, "requests_per_second": 10_000})
        seconds, verdicts = timed(lambda: judge.score_prompts(prompts[:n]))
        assert all(v.score == 0 for v in verdicts)
        return n / seconds

    base = run(1, 40)
    fast = run(64, 1000)
    report("judge client, concurrency 1 (50 ms server)", f"{base:.0f} req/s", "baseline")
    report("judge client, concurrency 64 (50 ms server)", f"{fast:.0f} req/s", f"{fast / base:.1f}x (target 200 req/s)")


# ---------------------------------------------------------------------------------------- planning


def bench_planning() -> None:
    command = [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/paper.yaml", "--quiet", "all"]
    seconds, result = timed(lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True))
    assert result.returncode == 0, result.stderr[-2000:]
    report("planning config/paper.yaml (snakemake -n)", f"{seconds:.1f} s", "target < 10 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", default=["floor", "extraction", "generation", "judge", "planning"])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    fp32 = bf16 = None
    if "floor" in args.only or "extraction" in args.only:
        fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
        report("matmul float32 (2048^2)", f"{fp32 / 1e9:.0f} GFLOP/s")
        report("matmul bfloat16 (2048^2)", f"{bf16 / 1e9:.0f} GFLOP/s")
    path = model_dir() if {"extraction", "generation"} & set(args.only) else ""
    if "extraction" in args.only:
        bench_extraction(path, fp32, bf16)
    if "generation" in args.only:
        bench_generation(path)
    if "judge" in args.only:
        bench_judge()
    if "planning" in args.only:
        bench_planning()


if __name__ == "__main__":
    main()
